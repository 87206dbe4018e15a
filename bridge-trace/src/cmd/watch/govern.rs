//! The overhead budget (`--max-overhead`): after every window, what tracing cost the traced
//! processes is measured — the run time of bridge-trace's eBPF programs, as the kernel counts it,
//! plus what each probe hit costs beyond that (the trap, and the single step of an instruction
//! the kernel cannot emulate), measured once at start per kind of place ([`ProbeCosts`]) and
//! charged to each program at the kind of its places in the targets ([`Hit`]) — and the tier or the
//! sampling interval is changed to stay inside the budget:
//! - `full` over budget steps down to `sampled`;
//! - `sampled` over budget doubles its interval, or steps down to `growth` when the probe hits
//!   alone (which no sampling interval avoids) cost more than the budget allows; well under
//!   budget it halves the interval back towards the one asked for;
//! - `growth`, when a site keeps growing, steps up to `sampled` for the few windows the
//!   leak classifier needs to name the allocation sites behind the growth (with an interval
//!   fine enough to see that growth several times a window), then back. A step-up's windows
//!   are shorter ([`STEP_UP_SPEEDUP`]): the verdict comes in seconds of sampling, not minutes.
//!   It is paid from the budget of the last [`BUDGET_HORIZON`]: the cost of every window is
//!   kept, a step-up starts only when the horizon's spending leaves room for one (as the last
//!   one cost), and ends when the horizon's spending reaches the budget — so that the average
//!   over every [`BUDGET_HORIZON`] stays inside it.
use std::{
    collections::{HashMap, VecDeque},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use super::Tier;
use crate::{
    attach::{Hit, ProbeCosts},
    model::meta::ProgramCost,
    units::human_bytes,
};

/// The largest sampling interval the budget drives the sampler to (beyond it: `growth`).
pub const MAX_ADAPTIVE_INTERVAL: u64 = 64 << 20;
/// Windows between two step-ups from `growth` when no budget is set.
const STEP_UP_COOLDOWN: u64 = 5;
/// A step-up's windows are this many times shorter than the watch's (at least
/// [`MIN_STEP_UP_WINDOW`]).
pub const STEP_UP_SPEEDUP: u32 = 5;
const MIN_STEP_UP_WINDOW: Duration = Duration::from_secs(1);
/// What the traps cost a real program against what the calibration measures on a function
/// of nothing: a trap also takes its caches and branch predictions from the program. Measured
/// by the programs' own CPU time (`budget_holds_by_the_targets_own_cpu_time`): 1.2-1.3 times
/// the calibration with jemalloc and on glibc's `reallocarray`, 0.8 times with glibc's
/// malloc; the budget takes the larger.
const TRAP_MARGIN: f64 = 1.35;
/// The budget holds on average over every span this long.
pub const BUDGET_HORIZON: Duration = Duration::from_secs(300);
/// The longest step-up: enough windows for the leak classifier to decide (allocations must
/// first grow old, then pile up for LEAK_WINDOWS windows).
pub const STEP_UP_WINDOWS: u64 =
    super::classify::LEAK_WINDOWS as u64 + super::classify::OLD_AFTER_WINDOWS as u64 + 3;
/// Sampled allocations wanted per window from a site growing at the rate the growth tier saw.
const STEP_UP_SAMPLES: f64 = 8.0;

/// A change of tier or sampling interval, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub tier: Tier,
    pub interval: u64,
    pub reason: String,
}

/// Cumulative figures from the kernel's program statistics.
#[derive(Clone, Debug, Default)]
struct Totals {
    run_ns: u64,
    /// Runs of each program.
    runs: HashMap<String, u64>,
}

impl Totals {
    fn of(costs: &[ProgramCost]) -> Totals {
        let mut runs: HashMap<String, u64> = HashMap::new();
        for c in costs {
            *runs.entry(c.program.clone()).or_default() += c.runs;
        }
        Totals {
            run_ns: costs.iter().map(|c| c.run_time_ns).sum(),
            runs,
        }
    }

    /// What the probe hits since `before` cost beyond the programs, in nanoseconds: each
    /// program's runs at the cost of its places (`hits`; programs not there are not uprobes).
    fn hits_ns(&self, before: &Totals, hits: &HashMap<&str, Hit>, costs: &ProbeCosts) -> f64 {
        self.runs
            .iter()
            .filter_map(|(program, &runs)| {
                let hit = hits.get(program.as_str())?;
                let then = before.runs.get(program).copied().unwrap_or(0);
                Some(runs.saturating_sub(then) as f64 * costs.per_run(*hit))
            })
            .sum()
    }
}

pub struct Governor {
    budget: Option<f64>,
    /// The tier and interval asked for.
    requested: (Tier, u64),
    pub tier: Tier,
    pub interval: u64,
    probe_costs: ProbeCosts,
    last: Option<(Instant, Totals)>,
    /// The last window's cost, in CPUs.
    pub overhead: f64,
    /// Of which, the probe hits that no sampling avoids.
    hits_overhead: f64,
    pub changes: u64,
    /// Each window's end and cost in CPU-seconds, over the last [`BUDGET_HORIZON`].
    spent: VecDeque<(Instant, f64)>,
    /// What the last step-up cost, in CPU-seconds.
    last_step_up_cost: f64,
    /// What the step-up under way has cost so far.
    step_up_cost: f64,
    /// Set while a step-up from `growth` lasts (the window it started in).
    pub stepped_up: Option<u64>,
    last_step_up_window: Option<u64>,
    /// Keeps the kernel's run-time statistics on while the watch runs.
    _stats: Option<OwnedFd>,
}

impl Governor {
    pub fn new(tier: Tier, interval: u64, budget: Option<f64>, probe_costs: ProbeCosts) -> Self {
        let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                // Without CAP_SYS_ADMIN the kernel refuses the descriptor, but the sysctl (set
                // by whoever deploys the watch, as the systemd unit does) counts the same.
                let on = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                    .is_ok_and(|v| v.trim() == "1");
                if !on {
                    tracing::warn!(
                        "cannot enable BPF run-time statistics ({e}): the programs' cost is not \
                         measured; set kernel.bpf_stats_enabled=1 or run with CAP_SYS_ADMIN"
                    );
                }
                None
            }
        };
        Governor {
            budget,
            requested: (tier, interval),
            tier,
            interval: if tier == Tier::Sampled { interval } else { 0 },
            probe_costs,
            last: None,
            overhead: 0.0,
            hits_overhead: 0.0,
            changes: 0,
            spent: VecDeque::new(),
            last_step_up_cost: 0.0,
            step_up_cost: 0.0,
            stepped_up: None,
            last_step_up_window: None,
            _stats: stats,
        }
    }

    pub fn budget(&self) -> Option<f64> {
        self.budget
    }

    /// Measures the window that just ended from the programs' cumulative statistics; `hits`:
    /// what a run of each uprobe program costs as its places are in the targets.
    pub fn measure(&mut self, costs: &[ProgramCost], hits: &HashMap<&str, Hit>) {
        let now = (Instant::now(), Totals::of(costs));
        if let Some((then, before)) = &self.last {
            let secs = now.0.duration_since(*then).as_secs_f64().max(1e-3);
            let run = now.1.run_ns.saturating_sub(before.run_ns) as f64;
            let hits = now.1.hits_ns(before, hits, &self.probe_costs) * TRAP_MARGIN;
            self.overhead = (run + hits) / 1e9 / secs;
            self.hits_overhead = hits / 1e9 / secs;
            self.spent.push_back((now.0, self.overhead * secs));
            while self
                .spent
                .front()
                .is_some_and(|&(at, _)| now.0.duration_since(at) > BUDGET_HORIZON)
            {
                self.spent.pop_front();
            }
            if self.stepped_up.is_some() {
                self.step_up_cost += self.overhead * secs;
            }
        }
        self.last = Some(now);
    }

    /// CPU-seconds spent over the last [`BUDGET_HORIZON`], and the budget's for it.
    fn horizon(&self, budget: f64) -> (f64, f64) {
        let spent = self.spent.iter().map(|&(_, cost)| cost).sum();
        (spent, budget * BUDGET_HORIZON.as_secs_f64())
    }

    /// How long the next window lasts, for a watch of `interval`: shorter while stepped up.
    pub fn window_length(&self, interval: Duration) -> Duration {
        match self.stepped_up {
            Some(_) => (interval / STEP_UP_SPEEDUP)
                .max(MIN_STEP_UP_WINDOW)
                .min(interval),
            None => interval,
        }
    }

    /// Decides on a change after window number `window` of `window_secs`. `growing`: the
    /// fastest growth (bytes/s) of a site the growth tier sees growing; `named`: a leaking
    /// allocation site has been named. The caller applies the change.
    pub fn decide(
        &mut self,
        window: u64,
        window_secs: f64,
        growing: Option<f64>,
        named: bool,
    ) -> Option<Change> {
        let pct = |v: f64| format!("{:.2}%", v * 100.0);
        if let Some(started) = self.stepped_up {
            let spent = self.budget.is_some_and(|b| {
                let (spent, allowed) = self.horizon(b);
                spent >= allowed
            });
            let why = if named {
                "the leaking allocation site is named".to_string()
            } else if spent {
                format!(
                    "the budget of the last {} is spent",
                    humantime::format_duration(BUDGET_HORIZON)
                )
            } else if window >= started + STEP_UP_WINDOWS {
                "no allocation site leaked while sampling".to_string()
            } else {
                return None;
            };
            self.stepped_up = None;
            self.last_step_up_cost = std::mem::take(&mut self.step_up_cost);
            return self.change(
                Tier::Growth,
                0,
                format!(
                    "back to growth after {} sampled windows: {why} (sampling cost {} of a CPU)",
                    window - started,
                    pct(self.overhead)
                ),
            );
        }
        let budget = self.budget;
        match (self.tier, budget) {
            (Tier::Full, Some(b)) if self.overhead > b => {
                let interval = self.requested.1;
                self.change(
                    Tier::Sampled,
                    interval,
                    format!(
                        "full tracing costs {} of a CPU, over the budget of {}",
                        pct(self.overhead),
                        pct(b)
                    ),
                )
            }
            (Tier::Sampled, Some(b)) if self.overhead > b => {
                let doubled = self.interval.saturating_mul(2);
                if self.hits_overhead > 0.8 * b || doubled > MAX_ADAPTIVE_INTERVAL {
                    self.change(
                        Tier::Growth,
                        0,
                        format!(
                            "the allocator probes cost {} of a CPU whatever the sampling \
                             interval, over the budget of {}",
                            pct(self.hits_overhead),
                            pct(b)
                        ),
                    )
                } else {
                    self.change(
                        Tier::Sampled,
                        doubled,
                        format!(
                            "sampling costs {} of a CPU, over the budget of {}",
                            pct(self.overhead),
                            pct(b)
                        ),
                    )
                }
            }
            (Tier::Sampled, Some(b))
                if self.overhead < b / 4.0 && self.interval > self.requested.1.max(1) =>
            {
                let halved = (self.interval / 2).max(self.requested.1);
                self.change(
                    Tier::Sampled,
                    halved,
                    format!(
                        "sampling costs {} of a CPU, well under the budget of {}",
                        pct(self.overhead),
                        pct(b)
                    ),
                )
            }
            (Tier::Growth, _) if growing.is_some() => {
                let allowed = match budget {
                    Some(b) => {
                        let (spent, allowed) = self.horizon(b);
                        spent + self.last_step_up_cost <= allowed
                    }
                    None => self
                        .last_step_up_window
                        .is_none_or(|w| window >= w + STEP_UP_COOLDOWN),
                };
                if !allowed {
                    return None;
                }
                self.stepped_up = Some(window);
                self.last_step_up_window = Some(window);
                // Fine enough to sample the growing site several times a (step-up) window.
                let rate = growing.unwrap_or(0.0);
                let step_up_secs = self
                    .window_length(Duration::from_secs_f64(window_secs))
                    .as_secs_f64();
                let interval = ((rate * step_up_secs / STEP_UP_SAMPLES) as u64)
                    .clamp(1024, self.requested.1.max(1024));
                self.change(
                    Tier::Sampled,
                    interval,
                    format!(
                        "the heap keeps growing ({}/s): sampling allocations to name the call \
                         sites",
                        human_bytes(rate as u64)
                    ),
                )
            }
            _ => None,
        }
    }

    fn change(&mut self, tier: Tier, interval: u64, reason: String) -> Option<Change> {
        if (tier, interval) == (self.tier, self.interval) {
            return None;
        }
        self.tier = tier;
        self.interval = interval;
        self.changes += 1;
        Some(Change {
            tier,
            interval,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(run_ns: u64, allocs: u64, frees: u64) -> Vec<ProgramCost> {
        let program = |name: &str, runs: u64| ProgramCost {
            program: name.into(),
            runs,
            ..ProgramCost::default()
        };
        vec![
            ProgramCost {
                run_time_ns: run_ns,
                ..program("alloc_return", allocs)
            },
            program("malloc_enter", allocs),
            program("free_enter", frees),
        ]
    }

    fn hits() -> HashMap<&'static str, Hit> {
        HashMap::from([
            ("alloc_return", Hit::Return),
            ("malloc_enter", Hit::Emulated),
            ("free_enter", Hit::Emulated),
        ])
    }

    const PROBE_COSTS: ProbeCosts = ProbeCosts {
        emulated_ns: 500.0,
        stepped_ns: 10_000.0,
        return_ns: 500.0,
        nop_ns: 200.0,
    };

    fn governor(tier: Tier, budget: f64) -> Governor {
        Governor::new(tier, 512 << 10, Some(budget), PROBE_COSTS)
    }

    /// Each program is charged at the cost of its places: the same calls cost 20 times more
    /// where the free probe is single-stepped.
    #[test]
    fn hits_are_charged_as_placed() {
        let before = Totals::of(&costs(0, 0, 0));
        let after = Totals::of(&costs(0, 1000, 1000));
        let emulated = after.hits_ns(&before, &hits(), &PROBE_COSTS);
        assert_eq!(emulated, 1000.0 * (500.0 + 500.0 + 500.0));
        let mut stepped_free = hits();
        stepped_free.insert("free_enter", Hit::SingleStepped);
        let stepped = after.hits_ns(&before, &stepped_free, &PROBE_COSTS);
        assert_eq!(stepped, 1000.0 * (500.0 + 500.0 + 10_000.0));
        // A program that is not a uprobe (a tracepoint) costs its run time only.
        assert_eq!(after.hits_ns(&before, &HashMap::new(), &PROBE_COSTS), 0.0);
    }

    #[test]
    fn over_budget_steps_down() {
        let mut g = governor(Tier::Full, 0.01);
        g.measure(&costs(0, 0, 0), &hits());
        // 100k calls and frees in about no time: far over 1 %.
        g.measure(&costs(1_000_000_000, 100_000, 100_000), &hits());
        let c = g.decide(1, 1.0, None, false).unwrap();
        assert_eq!((c.tier, c.interval), (Tier::Sampled, 512 << 10));
        g.measure(&costs(2_000_000_000, 200_000, 200_000), &hits());
        // The probe hits alone are over budget: no interval helps.
        let c = g.decide(2, 1.0, None, false).unwrap();
        assert_eq!(c.tier, Tier::Growth);
    }

    #[test]
    fn growth_steps_up_until_named() {
        let mut g = governor(Tier::Growth, 0.01);
        g.measure(&costs(0, 0, 0), &hits());
        assert_eq!(g.decide(1, 2.0, None, false), None);
        // 64 KiB/s; 2 s windows, 1 s while stepped up: 8 samples a step-up window is one per
        // 8 KiB.
        let c = g.decide(2, 2.0, Some(65536.0), false).unwrap();
        assert_eq!((c.tier, c.interval), (Tier::Sampled, 8192));
        assert_eq!(
            g.window_length(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            g.window_length(Duration::from_secs(10)),
            Duration::from_secs(2)
        );
        assert_eq!(g.decide(3, 2.0, Some(65536.0), false), None);
        assert_eq!(g.decide(4, 2.0, None, true).unwrap().tier, Tier::Growth);
    }

    #[test]
    fn step_up_ends_after_its_windows() {
        let mut g = governor(Tier::Growth, 0.01);
        g.decide(1, 1.0, Some(1e6), false).unwrap();
        for w in 2..1 + STEP_UP_WINDOWS {
            assert_eq!(g.decide(w, 1.0, None, false), None);
        }
        let c = g.decide(1 + STEP_UP_WINDOWS, 1.0, None, false).unwrap();
        assert_eq!(c.tier, Tier::Growth);
    }

    /// A step-up is paid from the budget of the last five minutes: it ends when that is spent,
    /// and the next starts only once the horizon has room for what the last one cost.
    #[test]
    fn step_ups_keep_the_budget_over_the_horizon() {
        // 1 % of a CPU: 3 CPU-seconds every five minutes.
        let mut g = governor(Tier::Growth, 0.01);
        g.measure(&costs(0, 0, 0), &hits());
        assert!(g.decide(1, 10.0, Some(1e5), false).is_some());
        // Each step-up window costs 1 CPU-second (1 s of a CPU in programs' run time).
        let mut run = 0;
        let mut window = 1;
        let ended = loop {
            window += 1;
            run += 1_000_000_000;
            g.measure(&costs(run, 0, 0), &hits());
            if let Some(c) = g.decide(window, 10.0, None, false) {
                break c;
            }
        };
        assert_eq!(ended.tier, Tier::Growth);
        assert!(
            ended.reason.contains("budget of the last 5m is spent"),
            "{ended:?}"
        );
        let (spent, allowed) = g.horizon(0.01);
        assert!(
            spent >= allowed && spent < allowed + 1.0,
            "{spent} of {allowed}"
        );
        // Growing still, but the horizon holds the step-up's cost: no step-up.
        window += 1;
        g.measure(&costs(run, 0, 0), &hits());
        assert_eq!(g.decide(window, 10.0, Some(1e5), false), None);
        // Once the spending has left the horizon, the next one may start.
        g.spent.clear();
        assert!(g.decide(window + 1, 10.0, Some(1e5), false).is_some());
    }
}
