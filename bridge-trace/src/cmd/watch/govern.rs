//! The overhead budget (`--max-overhead`): after every window, what tracing cost the traced
//! processes is measured — the run time of bridge-trace's eBPF programs, as the kernel counts it,
//! plus what each probe hit costs beyond that (the trap, and the single step of an instruction
//! the kernel cannot emulate), measured once at start ([`ProbeCosts`]) — and the tier or the
//! sampling interval is changed to stay inside the budget:
//! - `full` over budget steps down to `sampled`;
//! - `sampled` over budget doubles its interval, or steps down to `growth` when the probe hits
//!   alone (which no sampling interval avoids) cost more than the budget allows; well under
//!   budget it halves the interval back towards the one asked for;
//! - `growth`, when a site keeps growing, steps up to `sampled` for the few windows the
//!   leak classifier needs to name the allocation sites behind the growth (with an interval
//!   fine enough to see that growth several times a window), then back — paid from the budget
//!   the growth tier left unspent, so that the average stays inside it.
use std::{os::fd::OwnedFd, time::Instant};

use super::Tier;
use crate::{attach::ProbeCosts, model::meta::ProgramCost, units::human_bytes};

/// The largest sampling interval the budget drives the sampler to (beyond it: `growth`).
pub const MAX_ADAPTIVE_INTERVAL: u64 = 64 << 20;
/// Windows between two step-ups from `growth` when no budget is set.
const STEP_UP_COOLDOWN: u64 = 5;
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
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    run_ns: u64,
    /// Runs of the allocation return probe (one per allocator call).
    alloc_calls: u64,
    /// Runs of the free probe.
    frees: u64,
}

impl Totals {
    fn of(costs: &[ProgramCost]) -> Totals {
        let runs = |name: &str| {
            costs
                .iter()
                .filter(|c| c.program == name)
                .map(|c| c.runs)
                .sum()
        };
        Totals {
            run_ns: costs.iter().map(|c| c.run_time_ns).sum(),
            alloc_calls: runs("alloc_return"),
            frees: runs("free_enter"),
        }
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
    /// CPU-seconds of budget the growth tier left unspent, for step-ups.
    credit: f64,
    /// Cost of the last step-up window, in CPU-seconds.
    last_step_up_cost: f64,
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
                tracing::warn!("cannot enable BPF run-time statistics: {e}");
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
            credit: 0.0,
            last_step_up_cost: 0.0,
            stepped_up: None,
            last_step_up_window: None,
            _stats: stats,
        }
    }

    pub fn budget(&self) -> Option<f64> {
        self.budget
    }

    /// Measures the window that just ended from the programs' cumulative statistics.
    pub fn measure(&mut self, costs: &[ProgramCost]) {
        let now = (Instant::now(), Totals::of(costs));
        if let Some((then, before)) = self.last {
            let secs = now.0.duration_since(then).as_secs_f64().max(1e-3);
            let run = now.1.run_ns.saturating_sub(before.run_ns) as f64;
            let hits = now.1.alloc_calls.saturating_sub(before.alloc_calls) as f64
                * self.probe_costs.alloc_ns
                + now.1.frees.saturating_sub(before.frees) as f64 * self.probe_costs.free_ns;
            self.overhead = (run + hits) / 1e9 / secs;
            self.hits_overhead = hits / 1e9 / secs;
            if let (Some(budget), Tier::Growth) = (self.budget, self.tier) {
                // Unspent budget, kept for at most 100 windows' worth.
                self.credit = (self.credit + (budget - self.overhead) * secs)
                    .clamp(-budget * secs * 100.0, budget * secs * 100.0);
            }
            if self.stepped_up.is_some() {
                self.last_step_up_cost = self.overhead * secs;
                self.credit -= self.last_step_up_cost;
            }
        }
        self.last = Some(now);
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
            let spent = self.budget.is_some() && self.credit < 0.0;
            let why = if named {
                "the leaking allocation site is named"
            } else if spent {
                "the budget saved for it is spent"
            } else if window >= started + STEP_UP_WINDOWS {
                "no allocation site leaked while sampling"
            } else {
                return None;
            };
            self.stepped_up = None;
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
                    Some(_) => self.credit >= self.last_step_up_cost,
                    None => self
                        .last_step_up_window
                        .is_none_or(|w| window >= w + STEP_UP_COOLDOWN),
                };
                if !allowed {
                    return None;
                }
                self.stepped_up = Some(window);
                self.last_step_up_window = Some(window);
                // Fine enough to sample the growing site several times a window.
                let rate = growing.unwrap_or(0.0);
                let interval = ((rate * window_secs / STEP_UP_SAMPLES) as u64)
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
        vec![
            ProgramCost {
                program: "alloc_return".into(),
                runs: allocs,
                run_time_ns: run_ns,
                missed_runs: 0,
            },
            ProgramCost {
                program: "free_enter".into(),
                runs: frees,
                ..ProgramCost::default()
            },
        ]
    }

    fn governor(tier: Tier, budget: f64) -> Governor {
        let probe_costs = ProbeCosts {
            alloc_ns: 1000.0,
            free_ns: 1000.0,
        };
        Governor::new(tier, 512 << 10, Some(budget), probe_costs)
    }

    #[test]
    fn over_budget_steps_down() {
        let mut g = governor(Tier::Full, 0.01);
        g.measure(&costs(0, 0, 0));
        // 100k calls and frees in about no time: far over 1 %.
        g.measure(&costs(1_000_000_000, 100_000, 100_000));
        let c = g.decide(1, 1.0, None, false).unwrap();
        assert_eq!((c.tier, c.interval), (Tier::Sampled, 512 << 10));
        g.measure(&costs(2_000_000_000, 200_000, 200_000));
        // The probe hits alone are over budget: no interval helps.
        let c = g.decide(2, 1.0, None, false).unwrap();
        assert_eq!(c.tier, Tier::Growth);
    }

    #[test]
    fn growth_steps_up_until_named() {
        let mut g = governor(Tier::Growth, 0.01);
        g.measure(&costs(0, 0, 0));
        assert_eq!(g.decide(1, 2.0, None, false), None);
        // 64 KiB/s over 2 s windows: 8 samples a window is one per 16 KiB.
        let c = g.decide(2, 2.0, Some(65536.0), false).unwrap();
        assert_eq!((c.tier, c.interval), (Tier::Sampled, 16384));
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
}
