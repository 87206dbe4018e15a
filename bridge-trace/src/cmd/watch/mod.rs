//! `watch`: traces running services for as long as they run and, window after window, tells
//! which call sites leak ([`classify`]), exports it all as Prometheus metrics ([`metrics`]),
//! says so on stderr when a site starts leaking or grows past `--alert-growth`, and keeps its
//! cost inside the overhead budget by changing tier ([`govern`]). It reuses the record
//! pipeline's stages: attach, collect, symbolize, aggregate, render.
//!
//! One tracer serves every process watched (`--exe`: all processes of an executable, those
//! started later included); each process has its own windows, sites and classes.
pub mod bundle;
pub mod config;
pub mod classify;
pub mod govern;
pub mod metrics;
pub mod push;
pub mod view;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::Signal, sync::mpsc};

pub use config::{WatchConfig, WatchTarget};

use crate::{
    aggregate::{aggregate, Report},
    attach::{check_privileges, Knobs, ProbeCosts, Tracer},
    capture::{keep_own_mappings, Capture},
    collect,
    error::{Error, Result},
    model::{
        maps::ProcessMaps,
        meta::{Meta, REPORT_VERSION},
        snapshot::{LiveAlloc, Snapshot},
    },
    os::{pidfd_open, stop_signals, utc_now},
    symbolize::{symbolize_addrs, Blazesym, Frame},
    target::{self, Allocator},
    units::human_bytes,
    unwind::Unwinder,
};
use classify::{Class, Trend, Window, LEAK_WINDOWS, OLD_AFTER_WINDOWS};
use govern::{Change, Governor};

/// How often the targets' memory maps are re-read (for libraries they load).
const MAPS_REFRESH: Duration = Duration::from_millis(200);
/// How often `--exe` looks for new processes of the executable.
const DISCOVER_EVERY: Duration = Duration::from_secs(1);
/// The growth site of stacks that never leave the allocator: never classified as growing.
const INSIDE_ALLOCATOR: &str = "[inside the allocator]";
/// A site that has held nothing for this many windows is forgotten.
const FORGET_AFTER_WINDOWS: usize = 60;

/// Runs a `watch` until the duration, Ctrl-C/SIGTERM, or (with `--pid`) the process's exit.
pub fn run(config: &WatchConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    rt.block_on(run_async(config))
}

/// The windows of one kind of site (allocation sites, or growth sites) of one process.
#[derive(Default)]
struct Sites {
    trends: HashMap<String, Trend>,
    /// Windows since each site last held memory.
    idle: HashMap<String, usize>,
    /// Label of every stack seen (by stack id; 0 = stored without its stack, by return address).
    labels: HashMap<(u64, u64), String>,
    flagged: HashSet<String>,
    alerted: HashSet<String>,
}

/// A process being watched.
struct Proc {
    name: String,
    allocators: Vec<Allocator>,
    maps: ProcessMaps,
    started: Instant,
    windows: u64,
    allocs: Sites,
    growth: Sites,
    /// Allocation sites found leaking, as last seen: still exported once the allocator is no
    /// longer traced (the growth tier), so that a named leak stays on the dashboards.
    named: BTreeMap<String, metrics::SiteSample>,
    /// Growth sites explained by a leak named while they grew.
    explained: HashSet<String>,
}

/// Everything a watch holds.
struct Session<'c> {
    config: &'c WatchConfig,
    tracer: Tracer,
    unwinder: Option<Unwinder>,
    procs: BTreeMap<u32, Proc>,
    governor: Governor,
    exited: mpsc::UnboundedSender<u32>,
    /// Processes of `--exe` that could not be attached (not tried again).
    skipped: HashSet<u32>,
    windows: u64,
}

async fn run_async(config: &WatchConfig) -> Result<()> {
    check_privileges()?;
    // Bound before attaching: a taken or bad address fails before anything is traced.
    let listener = match config.metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Usage(format!("cannot serve metrics on {addr}: {e}")))?,
        ),
        None => None,
    };
    let (metrics_tx, metrics_rx) = tokio::sync::watch::channel(Arc::new(String::new()));
    if let Some(listener) = listener {
        // The address bound, which `--metrics-addr 127.0.0.1:0` leaves to the kernel.
        if let Ok(addr) = listener.local_addr() {
            eprintln!("bridge-trace: metrics at http://{addr}/metrics");
        }
        tokio::spawn(metrics::serve(listener, metrics_rx));
    }
    let mut stop = Stop {
        signals: stop_signals()?,
        deadline: config.duration.map(|d| tokio::time::Instant::now() + d),
    };
    if let WatchTarget::Pid(pid) = config.target {
        // A clear error before anything is loaded.
        target::inspect_pid(pid)?;
    }
    let mut tracer = Tracer::load(Knobs {
        tgid: 0,
        launched: false,
        max_allocs: config.max_allocs,
        unwind: config.unwind.mode(),
        follow_children: false,
    })?;
    let probe_costs = tracer.calibrate().unwrap_or_else(|e| {
        tracing::warn!("could not measure the probes' cost: {e}");
        ProbeCosts::default()
    });
    let governor = Governor::new(
        config.tier,
        config.sample_interval,
        config.max_overhead,
        probe_costs,
    );
    tracer.set_sample_interval(governor.interval)?;
    let unwinder = Unwinder::new(&mut tracer, config.unwind)?;
    let (exited_tx, mut exited_rx) = mpsc::unbounded_channel();
    let mut s = Session {
        config,
        tracer,
        unwinder,
        procs: BTreeMap::new(),
        governor,
        exited: exited_tx,
        skipped: HashSet::new(),
        windows: 0,
    };
    eprintln!(
        "bridge-trace: probes cost {:.2} µs per allocation and {:.2} µs per free here; tier {}{}{}",
        probe_costs.alloc_ns / 1e3,
        probe_costs.free_ns / 1e3,
        config.tier.name(),
        match config.max_overhead {
            Some(b) => format!(", budget {:.2}% of a CPU", b * 100.0),
            None => ", no overhead budget".into(),
        },
        match config.metrics_addr {
            Some(addr) => format!(", metrics on http://{addr}/metrics"),
            None => String::new(),
        }
    );
    match &config.target {
        WatchTarget::Pid(pid) => s.add(*pid).await?,
        WatchTarget::Exe(exe) => {
            s.discover(exe).await;
            if s.procs.is_empty() {
                eprintln!(
                    "bridge-trace: no process runs {} yet: waiting",
                    exe.display()
                );
            }
        }
    }
    let now = tokio::time::Instant::now();
    let mut refresh = tokio::time::interval(MAPS_REFRESH);
    let mut discover = tokio::time::interval_at(now + DISCOVER_EVERY, DISCOVER_EVERY);
    let mut windows = tokio::time::interval_at(now + config.interval, config.interval);
    let mut snapshots =
        tokio::time::interval_at(now + config.snapshot_every, config.snapshot_every);
    let exe = match &config.target {
        WatchTarget::Exe(exe) => Some(exe.clone()),
        WatchTarget::Pid(_) => None,
    };
    loop {
        tokio::select! {
            _ = stop.wait() => return Ok(()),
            Some(pid) = exited_rx.recv() => {
                s.remove(pid);
                eprintln!("bridge-trace: pid {pid} exited");
                match &exe {
                    None => return Ok(()),
                    Some(exe) if s.procs.is_empty() => eprintln!(
                        "bridge-trace: waiting for the next process of {}",
                        exe.display()
                    ),
                    Some(_) => {}
                }
            }
            c = async { s.unwinder.as_mut().unwrap().next_compiled().await }, if s.unwinder.is_some() => {
                if let (Some(c), Some(u)) = (c, s.unwinder.as_mut()) {
                    u.insert(c);
                    for (&pid, p) in &s.procs {
                        u.track(pid, &p.maps.current)?;
                    }
                }
            }
            _ = refresh.tick() => s.refresh_maps()?,
            _ = discover.tick(), if exe.is_some() => s.discover(exe.as_ref().unwrap()).await,
            _ = windows.tick() => {
                let (tracer_sample, samples) = s.window()?;
                let _ = metrics_tx.send(Arc::new(metrics::encode(&tracer_sample, &samples)));
                if let Some(rows) = config.view_rows {
                    for sample in &samples {
                        let p = &s.procs[&sample.pid];
                        view::show(&tracer_sample, sample, &p.name, p.started.elapsed(), rows);
                    }
                }
            }
            _ = snapshots.tick(), if config.out_dir.is_some() || config.push.is_some() => {
                s.snapshots().await;
            }
        }
    }
}

/// What ends a watch: the duration, SIGINT or SIGTERM.
struct Stop {
    signals: (Signal, Signal),
    deadline: Option<tokio::time::Instant>,
}

impl Stop {
    /// Resolves when the watch must stop.
    async fn wait(&mut self) {
        let deadline = self.deadline;
        let (sigint, sigterm) = &mut self.signals;
        tokio::select! {
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {}
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    }
}

impl Session<'_> {
    /// Starts watching `pid`. A process that has only just started (its loader has not mapped
    /// the allocator yet) is given a few tries.
    async fn add(&mut self, pid: u32) -> Result<()> {
        let mut tries = 0;
        let (maps, allocators) = loop {
            let found = target::inspect_pid(pid)
                .and_then(|maps| target::find_allocators(pid, &maps).map(|a| (maps, a)));
            match found {
                Err(Error::NoAllocator { .. }) if tries < 10 && target::alive(pid) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        // Readable once the process has exited.
        let pidfd = pidfd_open(pid)
            // SAFETY: the OwnedFd stays open, unchanged, for as long as the AsyncFd owns it.
            .and_then(|fd| unsafe { AsyncFd::register(fd) }.ok())
            .ok_or(Error::NoSuchProcess(pid))?;
        self.tracer.add_target(pid)?;
        let growth = target::growth_object(pid, &maps).map_or(Ok(()), |object| {
            self.tracer.trace_growth(pid, &object, true)
        });
        if let Err(e) = growth {
            self.tracer.remove_target(pid);
            return Err(e);
        }
        if self.governor.tier != Tier::Growth {
            if let Err(e) = self.tracer.trace_allocator(pid, &allocators) {
                self.tracer.remove_target(pid);
                return Err(e);
            }
        }
        if let Some(u) = self.unwinder.as_mut() {
            u.track(pid, &maps)?;
        }
        let tx = self.exited.clone();
        tokio::spawn(async move {
            let _ = pidfd.readable().await;
            let _ = tx.send(pid);
        });
        let name = target::comm(pid).unwrap_or_else(|| format!("pid{pid}"));
        eprintln!(
            "bridge-trace: watching {name} (pid {pid}) through {} [tier {}], a window every {}",
            target::describe(&allocators),
            self.governor.tier.name(),
            humantime::format_duration(self.config.interval),
        );
        self.procs.insert(
            pid,
            Proc {
                name,
                allocators,
                maps: ProcessMaps::new(pid, maps),
                started: Instant::now(),
                windows: 0,
                allocs: Sites::default(),
                growth: Sites::default(),
                named: BTreeMap::new(),
                explained: HashSet::new(),
            },
        );
        Ok(())
    }

    /// Starts watching the processes of `exe` not watched yet.
    async fn discover(&mut self, exe: &std::path::Path) {
        for pid in target::processes_of(exe) {
            if self.procs.contains_key(&pid) || self.skipped.contains(&pid) {
                continue;
            }
            match self.add(pid).await {
                Ok(()) => {}
                // It exited meanwhile.
                Err(Error::ExitedBeforeAttach(_) | Error::NoSuchProcess(_)) => {}
                Err(e) => {
                    eprintln!("bridge-trace: not watching pid {pid}: {e}");
                    self.skipped.insert(pid);
                }
            }
        }
    }

    /// Stops watching `pid` (it exited): its probes and kernel state go.
    fn remove(&mut self, pid: u32) {
        self.procs.remove(&pid);
        self.tracer.remove_target(pid);
        if let Some(u) = self.unwinder.as_mut() {
            u.forget(pid);
        }
    }

    fn refresh_maps(&mut self) -> Result<()> {
        for (&pid, p) in self.procs.iter_mut() {
            if p.maps.refresh() {
                if let Some(u) = self.unwinder.as_mut() {
                    u.track(pid, &p.maps.current)?;
                }
            }
        }
        Ok(())
    }

    /// Closes one window for every process, then lets the governor keep the cost in budget.
    fn window(&mut self) -> Result<(metrics::TracerSample, Vec<metrics::Sample>)> {
        self.windows += 1;
        let mut samples = Vec::new();
        let mut growing: Option<f64> = None;
        let mut named = false;
        let pids: Vec<u32> = self.procs.keys().copied().collect();
        for pid in pids {
            let snap = match collect::snapshot(&self.tracer, pid) {
                Ok(snap) => snap,
                Err(e) => {
                    tracing::warn!(pid, "snapshot failed: {e}");
                    continue;
                }
            };
            let traced = self.tracer.traces_allocator(pid);
            let p = self.procs.get_mut(&pid).expect("listed above");
            let (sample, alerts) = process_window(pid, p, &snap, self.config, traced);
            let leak_named = traced && sample.sites.iter().any(|s| s.class == Class::Leaking);
            // The growth sites flagged so far are explained by a leak named while sampling;
            // a step-up is for growth not explained yet.
            if leak_named {
                p.explained.extend(p.growth.flagged.iter().cloned());
            }
            for (label, trend) in &p.growth.trends {
                if label == INSIDE_ALLOCATOR || trend.growth_class() != Class::Growing {
                    continue;
                }
                if !p.explained.contains(label) {
                    let rate = trend.growth_rate(self.config.alert_window.as_secs_f64());
                    growing = Some(growing.unwrap_or(0.0).max(rate.max(0.0)));
                }
            }
            named |= leak_named;
            if !alerts.is_empty() {
                raise(pid, p, &snap, self.config, &self.governor, &alerts);
            }
            samples.push(sample);
        }
        let programs = self.tracer.program_costs();
        self.governor.measure(&programs);
        let secs = self.config.interval.as_secs_f64();
        let stepped_up = self.governor.stepped_up.is_some();
        let change = match self.config.fixed_tier {
            true => None,
            false => self.governor.decide(self.windows, secs, growing, named),
        };
        if let Some(change) = change {
            if stepped_up && !named {
                for sample in &samples {
                    suspects(&self.procs[&sample.pid], sample);
                }
            }
            self.apply(change)?;
        }
        let c = collect::counters(&self.tracer)?;
        let tracer_sample = metrics::TracerSample {
            allocs: c.allocs,
            frees: c.frees,
            unsampled: c.unsampled,
            growth_events: c.growth_events,
            dropped: c.map_full_drops
                + c.inflight_full
                + c.lost_returns
                + c.growth_map_full
                + programs.iter().map(|p| p.missed_runs).sum::<u64>(),
            tier: self.governor.tier.name(),
            sample_interval_bytes: self.governor.interval,
            overhead: self.governor.overhead,
            overhead_budget: self.governor.budget(),
            tier_changes: self.governor.changes,
            bpf_cpu_seconds: programs.iter().map(|p| p.run_time_ns).sum::<u64>() as f64 / 1e9,
            tracer_cpu_seconds: own_cpu_seconds(),
            processes: self.procs.len(),
        };
        Ok((tracer_sample, samples))
    }

    /// Applies a change of tier or sampling interval to every process.
    fn apply(&mut self, change: Change) -> Result<()> {
        eprintln!(
            "bridge-trace: tier {}{}: {}",
            change.tier.name(),
            match change.tier {
                Tier::Sampled => format!(" (one sample per {})", human_bytes(change.interval)),
                _ => String::new(),
            },
            change.reason
        );
        self.tracer.set_sample_interval(change.interval)?;
        for (&pid, p) in self.procs.iter_mut() {
            match change.tier {
                Tier::Growth => {
                    self.tracer.untrace_allocator(pid);
                    p.allocs = Sites::default();
                }
                Tier::Sampled | Tier::Full if !self.tracer.traces_allocator(pid) => {
                    if let Err(e) = self.tracer.trace_allocator(pid, &p.allocators) {
                        eprintln!("bridge-trace: pid {pid}: {e}");
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes a snapshot of every process to --out-dir and pushes it to --push.
    async fn snapshots(&mut self) {
        for (&pid, p) in &self.procs {
            let snap = match collect::snapshot(&self.tracer, pid) {
                Ok(snap) => snap,
                Err(e) => {
                    eprintln!("bridge-trace: {e}");
                    continue;
                }
            };
            let r = report(pid, p, &snap, &self.governor);
            if let Some(dir) = &self.config.out_dir {
                let name = format!("snapshot-{}-{pid}", utc_now());
                match bundle::write(dir, &name, &r, None, self.config.mode) {
                    Ok(_) => {
                        bundle::prune(dir, "snapshot-", self.config.keep, self.config.keep_size)
                    }
                    Err(e) => eprintln!("bridge-trace: {e}"),
                }
            }
            if let Some(url) = &self.config.push {
                let until = std::time::SystemTime::now();
                let from = until - self.config.snapshot_every;
                if let Err(e) = push::push(url, &p.name, pid, &r, from, until).await {
                    eprintln!("bridge-trace: --push: {e}");
                }
            }
        }
    }
}

/// Bytes, counts and ages per stack in one snapshot.
#[derive(Clone, Copy, Default)]
struct Held {
    bytes: f64,
    count: f64,
    old_bytes: f64,
    old_count: f64,
    oldest_ns: u64,
}

/// A site that just started leaking, or grows past `--alert-growth`.
struct Alert {
    site: String,
    /// `leaking`, `growing` or `growth`.
    reason: &'static str,
    /// The line logged.
    line: String,
}

/// Closes one window of one process: its sites' windows, classes, log lines and alerts.
fn process_window(
    pid: u32,
    p: &mut Proc,
    snap: &Snapshot,
    config: &WatchConfig,
    traced: bool,
) -> (metrics::Sample, Vec<Alert>) {
    p.windows += 1;
    let at_secs = p.started.elapsed().as_secs_f64();
    let mut alerts = Vec::new();
    let mut sites = Vec::new();
    if traced {
        let old_ns = (config.interval.as_secs_f64() * OLD_AFTER_WINDOWS * 1e9) as u64;
        let mut by_stack: HashMap<(u64, u64), Held> = HashMap::new();
        for a in &snap.allocs {
            let h = by_stack
                .entry(stack_key(a.stack_id, a.ret_addr))
                .or_default();
            let age = snap.taken_ns.saturating_sub(a.ts_ns);
            let (bytes, count) = a.estimate();
            h.bytes += bytes;
            h.count += count;
            if age >= old_ns {
                h.old_bytes += bytes;
                h.old_count += count;
            }
            h.oldest_ns = h.oldest_ns.max(age);
        }
        label_new_stacks(p, snap, by_stack.keys(), false);
        let held = by_site(&p.allocs.labels, &by_stack);
        classify_sites(
            pid,
            &mut p.allocs,
            held,
            at_secs,
            config,
            false,
            &mut sites,
            &mut alerts,
        );
        for s in sites.iter().filter(|s| s.class == Class::Leaking) {
            p.named.insert(s.label.clone(), s.clone());
        }
    }
    let mut by_stack: HashMap<(u64, u64), Held> = HashMap::new();
    for g in &snap.growth {
        let h = by_stack
            .entry(stack_key(g.stack_id, g.ret_addr))
            .or_default();
        h.bytes += g.faulted as f64;
        h.count += g.events as f64;
    }
    label_new_stacks(p, snap, by_stack.keys(), true);
    let held = by_site(&p.growth.labels, &by_stack);
    // Growth sites are followed in every tier (their history must not break) but shown only
    // in the growth tier, where they are all there is.
    let mut growth_sites = Vec::new();
    let mut growth_alerts = Vec::new();
    classify_sites(
        pid,
        &mut p.growth,
        held,
        at_secs,
        config,
        true,
        &mut growth_sites,
        &mut growth_alerts,
    );
    if !traced {
        sites.extend(growth_sites);
        alerts.extend(growth_alerts);
        sites.extend(p.named.values().cloned());
    }

    // Leaking or growing first, then fastest growing, then largest: the exported top sites.
    sites.sort_by(|a, b| {
        let bad = |s: &metrics::SiteSample| matches!(s.class, Class::Leaking | Class::Growing);
        bad(b)
            .cmp(&bad(a))
            .then(
                b.growth_bytes_per_second
                    .total_cmp(&a.growth_bytes_per_second),
            )
            .then(b.bytes.cmp(&a.bytes))
            .then(a.label.cmp(&b.label))
    });
    let sample = metrics::Sample {
        pid,
        rss_bytes: rss_bytes(pid),
        outstanding_bytes: snap.allocs.iter().map(|a| a.estimate().0).sum::<f64>() as u64,
        heap_growth_bytes: snap
            .growth
            .iter()
            .map(|g| g.mapped as i64 - g.unmapped as i64)
            .sum(),
        faulted_bytes: snap.growth.iter().map(|g| g.faulted).sum(),
        windows: p.windows,
        sites,
    };
    (sample, alerts)
}

fn stack_key(stack_id: u64, ret_addr: u64) -> (u64, u64) {
    if stack_id != 0 {
        (stack_id, 0)
    } else {
        (0, ret_addr)
    }
}

/// Sums stacks into sites by their labels.
fn by_site(
    labels: &HashMap<(u64, u64), String>,
    by_stack: &HashMap<(u64, u64), Held>,
) -> HashMap<String, Held> {
    let mut out: HashMap<String, Held> = HashMap::new();
    for (key, h) in by_stack {
        let label = labels
            .get(key)
            .cloned()
            .unwrap_or_else(|| "[unknown]".into());
        let s = out.entry(label).or_default();
        s.bytes += h.bytes;
        s.count += h.count;
        s.old_bytes += h.old_bytes;
        s.old_count += h.old_count;
        s.oldest_ns = s.oldest_ns.max(h.oldest_ns);
    }
    out
}

/// Pushes one window of each site, classifies it, and logs and alerts on what changed.
#[allow(clippy::too_many_arguments)]
fn classify_sites(
    pid: u32,
    state: &mut Sites,
    held: HashMap<String, Held>,
    at_secs: f64,
    config: &WatchConfig,
    growth_tier: bool,
    sites: &mut Vec<metrics::SiteSample>,
    alerts: &mut Vec<Alert>,
) {
    let labels: HashSet<String> = state.trends.keys().chain(held.keys()).cloned().collect();
    let span = config.alert_window.as_secs_f64();
    for label in labels {
        let h = held.get(&label).copied().unwrap_or_default();
        let idle = state.idle.entry(label.clone()).or_default();
        *idle = if h.bytes == 0.0 { *idle + 1 } else { 0 };
        if *idle > FORGET_AFTER_WINDOWS {
            state.trends.remove(&label);
            state.idle.remove(&label);
            continue;
        }
        let trend = state.trends.entry(label.clone()).or_default();
        trend.push(Window {
            at_secs,
            bytes: h.bytes.round() as u64,
            count: h.count.round() as u64,
            old_bytes: h.old_bytes.round() as u64,
            old_count: h.old_count.round() as u64,
            oldest_age_secs: h.oldest_ns as f64 / 1e9,
        });
        let class = if growth_tier && label == INSIDE_ALLOCATOR {
            Class::Steady
        } else if growth_tier {
            trend.growth_class()
        } else {
            trend.class()
        };
        let growth = trend.growth_rate(span);
        tracing::debug!(
            pid,
            site = %label,
            bytes = h.bytes,
            old_count = h.old_count,
            class = class.name(),
            "window"
        );
        let flagged = matches!(class, Class::Leaking | Class::Growing);
        if flagged && state.flagged.insert(label.clone()) {
            let line = if growth_tier {
                format!(
                    "bridge-trace: the heap of pid {pid} keeps growing: new memory first touched \
                     at {label}, {}/s over the last {LEAK_WINDOWS} windows ({} so far; the code \
                     that first touches new memory is not always the code that holds it)",
                    human_bytes(growth.max(0.0) as u64),
                    human_bytes(h.bytes as u64),
                )
            } else {
                format!(
                    "bridge-trace: leak at {label} (pid {pid}): holds {} in {} allocations; its \
                     allocations older than {OLD_AFTER_WINDOWS} windows piled up in the last \
                     {LEAK_WINDOWS} windows ({}/s)",
                    human_bytes(h.bytes as u64),
                    h.count.round(),
                    human_bytes(growth.max(0.0) as u64)
                )
            };
            eprintln!("{line}");
            alerts.push(Alert {
                site: label.clone(),
                reason: if growth_tier { "growing" } else { "leaking" },
                line,
            });
        }
        if let Some(limit) = config.alert_growth {
            if flagged && growth >= limit && state.alerted.insert(label.clone()) {
                let line = format!(
                    "bridge-trace: ALERT: {label} (pid {pid}) grows {}/s over the last {}, above \
                     {}/s",
                    human_bytes(growth as u64),
                    humantime::format_duration(config.alert_window),
                    human_bytes(limit as u64)
                );
                eprintln!("{line}");
                alerts.push(Alert {
                    site: label.clone(),
                    reason: "growth",
                    line,
                });
            }
        }
        sites.push(metrics::SiteSample {
            label,
            class,
            bytes: h.bytes.round() as u64,
            count: h.count.round() as u64,
            old_bytes: h.old_bytes.round() as u64,
            growth_bytes_per_second: growth,
        });
    }
}

/// When sampling stops before a leak could be named: the allocation sites holding the most of
/// what was allocated while sampling, as leads (one or a few windows cannot tell a leak from a
/// cache's turnover).
fn suspects(p: &Proc, sample: &metrics::Sample) {
    let mut held: Vec<&metrics::SiteSample> = sample
        .sites
        .iter()
        .filter(|s| !matches!(s.class, Class::Growing | Class::Steady) && s.bytes > 0)
        .collect();
    held.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.label.cmp(&b.label)));
    for s in held.iter().take(3) {
        eprintln!(
            "bridge-trace: {} (pid {}): allocated while sampling and still held: ~{} in ~{} \
             allocations at {} (a lead, not a verdict)",
            p.name,
            sample.pid,
            human_bytes(s.bytes),
            s.count,
            s.label
        );
    }
}

/// The report of one snapshot: live allocations when they are traced, else the stacks that
/// touched new memory (growth tier), weighted by the bytes they touched.
fn report(pid: u32, p: &Proc, snap: &Snapshot, governor: &Governor) -> Report {
    let view;
    let (snap, interval) = if governor.tier == Tier::Growth {
        view = Snapshot {
            allocs: snap
                .growth
                .iter()
                .filter(|g| g.faulted > 0)
                .map(|g| LiveAlloc {
                    addr: 0,
                    size: g.faulted,
                    ts_ns: snap.taken_ns,
                    stack_id: g.stack_id,
                    ret_addr: g.ret_addr,
                    kind: None,
                    tid: 0,
                    interval: 0,
                })
                .collect(),
            // The growth tier reports touched pages, mapped regions included.
            regions: Vec::new(),
            ..snap.clone()
        };
        (&view, None)
    } else {
        // Regions the program mapped itself, not those its allocators map for their blocks.
        let mut own = snap.clone();
        let allocators: Vec<String> = p.allocators.iter().map(|a| a.path.clone()).collect();
        keep_own_mappings(&mut own, &p.maps, &allocators);
        view = own;
        (&view, (governor.interval > 0).then_some(governor.interval))
    };
    let meta = Meta {
        version: REPORT_VERSION,
        target: p.name.clone(),
        pid,
        duration_secs: p.started.elapsed().as_secs_f64(),
        target_exited: false,
        min_age_secs: None,
        allocator: target::describe(&p.allocators),
        counters: snap.counters,
        sample_interval: interval,
        exe: target::exe(pid),
        tier: Some(governor.tier.name().into()),
        ..Meta::default()
    }
    .on_this_machine();
    let capture = Capture::new(snap, &p.maps, None, meta);
    aggregate(&capture, &mut Blazesym::process(&p.maps))
}

/// Writes an incident bundle for `alerts` (with --out-dir) and runs --on-alert for each.
fn raise(
    pid: u32,
    p: &Proc,
    snap: &Snapshot,
    config: &WatchConfig,
    governor: &Governor,
    alerts: &[Alert],
) {
    let stamp = utc_now();
    let bundle = config.out_dir.as_ref().and_then(|dir| {
        let text: Vec<&str> = alerts.iter().map(|a| a.line.as_str()).collect();
        let r = report(pid, p, snap, governor);
        match bundle::write(
            dir,
            &format!("incident-{stamp}-{pid}"),
            &r,
            Some(&text.join("\n")),
            config.mode,
        ) {
            Ok(path) => {
                eprintln!("bridge-trace: incident bundle {}", path.display());
                Some(path)
            }
            Err(e) => {
                eprintln!("bridge-trace: {e}");
                None
            }
        }
    });
    let Some(cmd) = &config.on_alert else {
        return;
    };
    for a in alerts {
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .env("BRIDGE_TRACE_SITE", &a.site)
            .env("BRIDGE_TRACE_REASON", a.reason)
            .env("BRIDGE_TRACE_PID", pid.to_string())
            .stdin(std::process::Stdio::null());
        if let Some(b) = &bundle {
            c.env("BRIDGE_TRACE_BUNDLE", b);
        }
        match c.spawn() {
            // Reaped by a thread of its own: a slow hook never holds the watch up.
            Ok(mut child) => {
                std::thread::spawn(move || child.wait());
            }
            Err(e) => eprintln!("bridge-trace: --on-alert: {e}"),
        }
    }
}

/// Names the stacks not seen before by their site: the innermost frame outside the allocator's
/// object (for allocations: the allocator's direct caller; for growth: the code that made the
/// heap grow, through malloc or not), as `function (file:line)`.
fn label_new_stacks<'a>(
    p: &mut Proc,
    snap: &Snapshot,
    keys: impl Iterator<Item = &'a (u64, u64)>,
    growth: bool,
) {
    let labels = if growth {
        &mut p.growth.labels
    } else {
        &mut p.allocs.labels
    };
    let new: Vec<((u64, u64), Vec<u64>)> = keys
        .filter(|k| !labels.contains_key(k))
        .map(|&k| {
            let frames = match k {
                (0, ret) => vec![ret],
                (id, _) => snap
                    .stacks
                    .get(&id)
                    .map(|s| s.frames.clone())
                    .unwrap_or_default(),
            };
            (k, frames)
        })
        .collect();
    if new.is_empty() {
        return;
    }
    let mut addrs: Vec<u64> = new.iter().flat_map(|(_, f)| f.iter().copied()).collect();
    addrs.sort_unstable();
    addrs.dedup();
    let named = symbolize_addrs(&mut Blazesym::process(&p.maps), &p.maps, &addrs);
    let file = |path: &str| path.rsplit('/').next().unwrap_or_default().to_string();
    let allocator_files: Vec<String> = p.allocators.iter().map(|a| file(&a.path)).collect();
    let in_allocator = |f: &Frame| {
        f.module
            .as_deref()
            .is_some_and(|m| allocator_files.contains(&file(m)))
    };
    for (key, frames) in new {
        // Innermost frame first; inlined frames are listed outermost first per address. A
        // frame in no mapping (a return through a uretprobe's trampoline, whose real return
        // address only the kernel knows) ends what can be said about the stack.
        let known: Vec<&Frame> = frames
            .iter()
            .filter_map(|a| named.get(a).and_then(|fs| fs.last()))
            .take_while(|f| f.module.is_some() || f.function.is_some())
            .collect();
        let label = if growth {
            // Growth whose stack never leaves the allocator (cut short by a return probe's
            // trampoline while allocations are sampled) says nothing about who grew the heap.
            match known.iter().find(|f| !in_allocator(f)) {
                Some(f) => site_label(f),
                None => INSIDE_ALLOCATOR.to_string(),
            }
        } else {
            known
                .first()
                .map(|f| site_label(f))
                .unwrap_or_else(|| "[unknown]".into())
        };
        labels.insert(key, label);
    }
}

/// `function (file:line)`, the file by its last component; `[unknown] (module+0xoffset)`.
fn site_label(f: &Frame) -> String {
    let name = f.display_name();
    match (&f.file, f.line, &f.module, f.offset) {
        (Some(file), Some(line), _, _) => {
            format!(
                "{name} ({}:{line})",
                file.rsplit('/').next().unwrap_or(file)
            )
        }
        (_, _, Some(module), Some(offset)) if f.function.is_none() => {
            format!(
                "{name} ({}+{offset:#x})",
                module.rsplit('/').next().unwrap_or(module)
            )
        }
        _ => name.to_string(),
    }
}

/// CPU time of this process so far, user and system.
fn own_cpu_seconds() -> f64 {
    // SAFETY: all zeroes is a valid rusage; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall with a valid out-struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The process's resident set size, from /proc/PID/statm.
fn rss_bytes(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: plain libc call.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    pages * page
}

/// How much `watch` traces (and costs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Tier {
    /// Heap growth only (brk, anonymous mmap/munmap/mremap, first-touch page faults), with
    /// stacks: no allocator probes, the cheapest.
    Growth,
    /// Allocations sampled by bytes (one per --sample-interval on average), estimates scaled
    /// back.
    Sampled,
    /// Every allocation and free, with its stack, as `record` does.
    Full,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Growth => "growth",
            Tier::Sampled => "sampled",
            Tier::Full => "full",
        }
    }
}
