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
pub mod export;
pub mod govern;
pub mod metrics;
pub mod push;
pub mod view;
mod window;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::Signal, sync::mpsc};

pub use config::{WatchConfig, WatchTarget};

use crate::model::classify::{self, Class, Trend};
use crate::{
    aggregate::{aggregate, Report},
    attach::{check_privileges, Knobs, ProbeCosts, Tracer},
    capture::{keep_own_mappings, Capture},
    collect,
    error::{Error, Result},
    model::{
        maps::{ProcessMaps, Refresh},
        meta::{Meta, REPORT_VERSION, USDT_TIER},
        sites::{Callers, Wrappers},
        snapshot::{LiveAlloc, Snapshot},
        timeline::Recorder,
    },
    os::{pidfd_open, stop_signals, utc_now},
    symbolize::Blazesym,
    target::{self, usdt::Carrier, Allocator},
    units::human_bytes,
    unwind::Unwinder,
};
use govern::{Change, Governor};
use window::{process_window, suspects, Alert};

/// How often the targets' memory maps are re-read (for libraries they load).
const MAPS_REFRESH: Duration = Duration::from_millis(200);
/// How often `--exe` and `--cgroup` look for new processes.
const DISCOVER_EVERY: Duration = Duration::from_secs(1);

/// Where `watch` looks, every [`DISCOVER_EVERY`], for processes to add: those of an executable
/// (`--exe`) or of a cgroup and its descendants (`--cgroup`).
enum Discovery {
    Exe(std::path::PathBuf),
    Cgroup(std::path::PathBuf),
}

impl Discovery {
    fn of(target: &WatchTarget) -> Option<Discovery> {
        match target {
            WatchTarget::Exe(exe) => Some(Discovery::Exe(exe.clone())),
            WatchTarget::Cgroup(dir) => Some(Discovery::Cgroup(dir.clone())),
            WatchTarget::Pid(_) | WatchTarget::Launch { .. } => None,
        }
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            Discovery::Exe(exe) => target::processes_of(exe),
            Discovery::Cgroup(dir) => target::cgroup::processes_in(dir),
        }
    }

    fn none_yet(&self) -> String {
        match self {
            Discovery::Exe(exe) => format!("no process runs {} yet", exe.display()),
            Discovery::Cgroup(dir) => format!("no process in cgroup {} yet", dir.display()),
        }
    }

    fn of_what(&self) -> String {
        match self {
            Discovery::Exe(exe) => format!("of {}", exe.display()),
            Discovery::Cgroup(dir) => format!("in cgroup {}", dir.display()),
        }
    }
}

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
    /// Its symbolizer, kept from window to window: the files it read and their debug info
    /// (Debian's are compressed) are parsed once, not for every window that shows new stacks.
    symbolizer: Blazesym,
    started: Instant,
    windows: u64,
    allocs: Sites,
    growth: Sites,
    /// Allocation sites found leaking, as last seen: still exported once the allocator is no
    /// longer traced (the growth tier), so that a named leak stays on the dashboards.
    named: BTreeMap<String, metrics::SiteSample>,
    /// Growth sites explained by a leak named while they grew.
    explained: HashSet<String>,
    /// The wrapper rule for this process: the configured one and the wrappers its stacks show.
    wrappers: Wrappers,
    /// Candidate wrappers of its stacks, and their callers.
    callers: Callers,
    /// When (seconds since `started`) its growth sites last had a window.
    growth_at: Option<f64>,
    /// It is traced through the `otel_memory` contract (tier usdt, whatever the governor's):
    /// the objects that carry it, and those of them that interpose the allocator (whose
    /// frames top each sample's stack).
    usdt: Option<UsdtObjects>,
    /// The objects carrying the contract it maps, seen so far (traced or not).
    usdt_seen: Vec<String>,
    /// It holds as many live samples as `--max-samples`: its new ones are dropped.
    usdt_capped: bool,
    /// That was said (once: a process at its cap goes in and out of it as samples are freed).
    usdt_cap_said: bool,
    /// What it held and its resident set at each window, the peak, the tier changes and
    /// alerts: the chart of its snapshots and incident bundles.
    timeline: Recorder,
    /// Its cgroup (`--cgroup`): labels of its metrics, attributes of its exported profiles.
    cgroup: Option<target::cgroup::Membership>,
}

/// The objects through which a process reports its samples ([`Tier::Usdt`]).
struct UsdtObjects {
    interposers: Vec<String>,
}

impl Proc {
    /// The tier this process is traced at.
    fn tier(&self, governor: &Governor) -> Tier {
        if self.usdt.is_some() {
            Tier::Usdt
        } else {
            governor.tier
        }
    }

    /// A snapshot of the process as the kernel half knows it, without the frames of an
    /// interposing in-process sampler.
    fn snapshot(&self, tracer: &Tracer, pid: u32) -> Result<Snapshot> {
        let mut snap = collect::snapshot(tracer, pid)?;
        if let Some(u) = &self.usdt {
            snap.drop_leading_frames(&self.maps.text_of(&u.interposers));
        }
        Ok(snap)
    }
}

/// Starts `argv` (`watch -- CMD`) as the invoking user, with the sampler preloaded when
/// asked, reaped by a thread of its own; returns its pid once the sampler is mapped (its
/// probes are found from the maps), or at once without it.
fn launch(argv: &[std::ffi::OsString], sampler: bool) -> Result<u32> {
    let program = target::resolve_program(&argv[0])?;
    let lib = match sampler {
        true => Some(target::sampler::install(&target::sampler::default_dir()?)?),
        false => None,
    };
    let env: Vec<(&str, std::ffi::OsString)> = lib
        .iter()
        .map(|l| {
            (
                "LD_PRELOAD",
                target::sampler::preload(l, std::env::var_os("LD_PRELOAD")),
            )
        })
        .collect();
    let mut launched = target::Launched::spawn(&program, argv, &env)?;
    let pid = launched.pid;
    launched.release()?;
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: plain syscall on our own child.
        unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    });
    if let Some(lib) = lib {
        // The dynamic loader maps preloaded libraries first, within milliseconds of the exec.
        let started = Instant::now();
        let mapped = || {
            crate::model::maps::read_maps(pid)
                .is_ok_and(|maps| maps.iter().any(|m| std::path::Path::new(&m.path) == lib))
        };
        while !mapped() && target::alive(pid) && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(pid)
}

/// Everything a watch holds.
struct Session<'c> {
    config: &'c WatchConfig,
    /// Where snapshots are sent (`--push`, `--otlp`).
    exports: &'c [export::Endpoint],
    tracer: Tracer,
    unwinder: Option<Unwinder>,
    procs: BTreeMap<u32, Proc>,
    governor: Governor,
    exited: mpsc::UnboundedSender<u32>,
    /// Processes of `--exe` that could not be attached (not tried again).
    skipped: HashSet<u32>,
    windows: u64,
    /// The length of the window under way: the watch's interval, shorter while stepped up.
    window_length: Duration,
}

async fn run_async(config: &WatchConfig) -> Result<()> {
    check_privileges()?;
    let mut exports = Vec::new();
    if let Some(url) = &config.push {
        exports.push(export::Endpoint::new(export::Kind::Pyroscope, url)?);
    }
    if let Some(url) = &config.otlp {
        exports.push(export::Endpoint::new(export::Kind::Otlp, url)?);
    }
    let result = watch(config, &exports).await;
    export::finish_all(exports, export::DRAIN_TIMEOUT);
    result
}

async fn watch(config: &WatchConfig, exports: &[export::Endpoint]) -> Result<()> {
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
        let costs = ProbeCosts::default();
        eprintln!(
            "bridge-trace: could not measure what a probe hit costs here ({e}): the budget \
             assumes {:.1} µs a hit, {:.0} µs single-stepped",
            costs.emulated_ns / 1e3,
            costs.stepped_ns / 1e3
        );
        costs
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
        exports,
        tracer,
        unwinder,
        procs: BTreeMap::new(),
        governor,
        exited: exited_tx,
        skipped: HashSet::new(),
        windows: 0,
        window_length: config.interval,
    };
    eprintln!(
        "bridge-trace: a probe hit costs {:.2} µs here ({:.1} µs single-stepped, {:.2} µs more \
         for a return probe, {:.2} µs at a USDT site), charged as each probe is placed; tier \
         {}{}{}",
        probe_costs.emulated_ns / 1e3,
        probe_costs.stepped_ns / 1e3,
        probe_costs.return_ns / 1e3,
        probe_costs.nop_ns / 1e3,
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
    let discovery = Discovery::of(&config.target);
    match &config.target {
        WatchTarget::Pid(pid) => s.add(*pid).await?,
        WatchTarget::Launch { argv, sampler } => s.add(launch(argv, *sampler)?).await?,
        WatchTarget::Exe(_) | WatchTarget::Cgroup(_) => {}
    }
    if let Some(found) = &discovery {
        s.discover(found).await;
        if s.procs.is_empty() {
            eprintln!("bridge-trace: {}: waiting", found.none_yet());
        }
    }
    let now = tokio::time::Instant::now();
    // The duration counts from here, where the windows start: its last window ends with it.
    stop.deadline = config.duration.map(|d| now + d);
    let mut last_window = now;
    let mut refresh = tokio::time::interval(MAPS_REFRESH);
    let mut discover = tokio::time::interval_at(now + DISCOVER_EVERY, DISCOVER_EVERY);
    let mut windows = tokio::time::interval_at(now + config.interval, config.interval);
    let mut snapshots =
        tokio::time::interval_at(now + config.snapshot_every, config.snapshot_every);
    loop {
        tokio::select! {
            _ = stop.wait() => {
                // `top` draws the window the stop ends (at --duration: the last whole one),
                // unless it was drawn just now.
                if config.view_rows.is_some() && last_window.elapsed() > config.interval / 2 {
                    let (tracer_sample, samples) = s.window()?;
                    show_view(&s, &tracer_sample, &samples);
                }
                return Ok(());
            }
            Some(pid) = exited_rx.recv() => {
                s.remove(pid);
                eprintln!("bridge-trace: pid {pid} exited");
                match &discovery {
                    None => return Ok(()),
                    Some(d) if s.procs.is_empty() => {
                        eprintln!("bridge-trace: waiting for the next process {}", d.of_what())
                    }
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
            _ = discover.tick(), if discovery.is_some() => {
                s.discover(discovery.as_ref().unwrap()).await
            }
            _ = windows.tick() => {
                last_window = tokio::time::Instant::now();
                let (tracer_sample, samples) = s.window()?;
                let _ = metrics_tx.send(Arc::new(metrics::encode(&tracer_sample, &samples)));
                show_view(&s, &tracer_sample, &samples);
                // A step-up's windows are shorter.
                let length = s.governor.window_length(config.interval);
                if length != s.window_length {
                    s.window_length = length;
                    windows = tokio::time::interval_at(last_window + length, length);
                }
            }
            _ = snapshots.tick(), if config.out_dir.is_some() || !exports.is_empty() => {
                s.snapshots();
            }
        }
    }
}

/// `top`'s view of one window, for every process.
fn show_view(s: &Session<'_>, tracer: &metrics::TracerSample, samples: &[metrics::Sample]) {
    if let Some(rows) = s.config.view_rows {
        for sample in samples {
            if let Some(p) = s.procs.get(&sample.pid) {
                view::show(tracer, sample, &p.name, p.started.elapsed(), rows);
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
        // --inject: the sampler is loaded first, and the process traced through it.
        let maps = match self.config.inject {
            true => {
                let mean = self.config.sample_interval;
                let done = tokio::task::spawn_blocking(move || target::inject::inject(pid, mean))
                    .await
                    .map_err(|e| Error::Inject {
                        pid,
                        reason: e.to_string(),
                    })??;
                eprintln!("bridge-trace: {}", done.describe(pid));
                target::inspect_pid(pid)?
            }
            false => maps,
        };
        // Readable once the process has exited.
        let pidfd = pidfd_open(pid)
            // SAFETY: the OwnedFd stays open, unchanged, for as long as the AsyncFd owns it.
            .and_then(|fd| unsafe { AsyncFd::register(fd) }.ok())
            .ok_or(Error::NoSuchProcess(pid))?;
        // The tables first, then the probes: no stack is walked without them.
        if let Some(u) = self.unwinder.as_mut() {
            u.load_now(pid, &maps).await?;
        }
        // The objects carrying the contract, read once: traced now, and known at each refresh.
        let carriers = match self.config.usdt {
            true => target::usdt::carriers(pid, &maps),
            false => Vec::new(),
        };
        let usdt_seen: Vec<String> = carriers.iter().map(|c| c.path.clone()).collect();
        let usdt = match self.trace_usdt(pid, &carriers) {
            Ok(u) => u,
            Err(e) => {
                self.tracer.remove_target(pid);
                return Err(e);
            }
        };
        if usdt.is_none() {
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
                self.tracer.note_allocator_text(pid, &maps);
            }
        }
        let tx = self.exited.clone();
        tokio::spawn(async move {
            let _ = pidfd.readable().await;
            let _ = tx.send(pid);
        });
        let name = target::comm(pid).unwrap_or_else(|| format!("pid{pid}"));
        let (through, tier) = match &usdt {
            Some((_, line)) => (line.clone(), Tier::Usdt),
            None => (target::describe(&allocators), self.governor.tier),
        };
        let cgroup = match self.config.target {
            WatchTarget::Cgroup(_) => target::cgroup::membership(pid),
            _ => None,
        };
        eprintln!(
            "bridge-trace: watching {name} (pid {pid}{}) through {through} [tier {}], a window \
             every {}",
            match &cgroup {
                Some(c) => format!(", cgroup {}", c.path),
                None => String::new(),
            },
            tier.name(),
            humantime::format_duration(self.config.interval),
        );
        let maps = ProcessMaps::new(pid, maps);
        self.procs.insert(
            pid,
            Proc {
                name,
                allocators,
                symbolizer: Blazesym::process(&maps),
                maps,
                started: Instant::now(),
                windows: 0,
                allocs: Sites::default(),
                growth: Sites::default(),
                named: BTreeMap::new(),
                explained: HashSet::new(),
                wrappers: self.config.wrappers.clone(),
                callers: Callers::default(),
                growth_at: None,
                usdt_seen,
                usdt_capped: false,
                usdt_cap_said: false,
                usdt: usdt.map(|(u, _)| u),
                timeline: Recorder::new(self.config.interval.as_secs_f64()),
                cgroup,
            },
        );
        Ok(())
    }

    /// Traces `pid` through the `otel_memory` contract of `carriers`, the objects it maps that
    /// carry it (none with --no-usdt): its objects and the start line's description; `None`
    /// when there are none, or when its probes could not be attached (said; today's tiers then).
    fn trace_usdt(
        &mut self,
        pid: u32,
        carriers: &[Carrier],
    ) -> Result<Option<(UsdtObjects, String)>> {
        for line in target::usdt::skipped(carriers) {
            eprintln!("bridge-trace: {line}");
        }
        if carriers.is_empty() {
            return Ok(None);
        }
        let sites = match self.tracer.trace_usdt(pid, carriers) {
            Ok(n) => n,
            Err(e @ (Error::ExitedBeforeAttach(_) | Error::NoSuchProcess(_))) => return Err(e),
            Err(e) => {
                eprintln!("bridge-trace: pid {pid} carries the otel_memory probes, not used: {e}");
                self.tracer.untrace_allocator(pid);
                return Ok(None);
            }
        };
        let line = target::usdt::describe(carriers, sites);
        let objects = UsdtObjects {
            interposers: target::usdt::interposers(carriers),
        };
        Ok(Some((objects, line)))
    }

    /// The objects carrying the contract that `pid` mapped since its probes were attached (a
    /// dlopen): a process traced at tier usdt gets their probes too; one traced by uprobes
    /// keeps them (its samples would count its allocations twice), which is said once.
    fn trace_new_carriers(&mut self, pid: u32) {
        let Some(p) = self.procs.get_mut(&pid).filter(|_| self.config.usdt) else {
            return;
        };
        let fresh: Vec<Carrier> = target::usdt::carriers(pid, &p.maps.current)
            .into_iter()
            .filter(|c| !p.usdt_seen.contains(&c.path))
            .collect();
        if fresh.is_empty() {
            return;
        }
        p.usdt_seen.extend(fresh.iter().map(|c| c.path.clone()));
        for line in target::usdt::skipped(&fresh) {
            eprintln!("bridge-trace: {line}");
        }
        let Some(u) = p.usdt.as_mut() else {
            eprintln!(
                "bridge-trace: pid {pid} mapped {}, which carries the otel_memory probes: not \
                 used, as the process is traced by uprobes (a new watch uses them)",
                fresh
                    .iter()
                    .map(|c| c.path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return;
        };
        match self.tracer.trace_usdt(pid, &fresh) {
            Ok(sites) => {
                eprintln!(
                    "bridge-trace: pid {pid} mapped {}: tracing it through them too",
                    target::usdt::describe(&fresh, sites)
                );
                u.interposers.extend(target::usdt::interposers(&fresh));
            }
            Err(e) => eprintln!(
                "bridge-trace: pid {pid}: the otel_memory probes of a new object, not used: {e}"
            ),
        }
    }

    /// Starts watching the processes `found` finds that are not watched yet.
    async fn discover(&mut self, found: &Discovery) {
        for pid in found.pids() {
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
        let mut changed = Vec::new();
        for (&pid, p) in self.procs.iter_mut() {
            let before = self.config.inject.then(|| p.maps.current.clone());
            if p.maps.refresh() == Refresh::Changed {
                if let Some(before) = before {
                    let (mean, now) = (self.config.sample_interval, &p.maps.current);
                    if let Some(said) = target::inject::follow_new_code(pid, mean, &before, now) {
                        eprintln!("bridge-trace: {said}");
                    }
                }
                self.tracer.note_allocator_text(pid, &p.maps.current);
                if let Some(u) = self.unwinder.as_mut() {
                    u.track(pid, &p.maps.current)?;
                }
                changed.push(pid);
            }
        }
        for pid in changed {
            self.trace_new_carriers(pid);
        }
        Ok(())
    }

    /// Keeps a process at tier usdt within `--max-samples` live samples: capped when it holds
    /// them all, uncapped when it holds 1/8 fewer (said the first time; the samples dropped
    /// are counted).
    fn cap_samples(&mut self, pid: u32, snap: &Snapshot) {
        let cap = self.config.max_samples;
        let Some(p) = self.procs.get_mut(&pid).filter(|p| p.usdt.is_some()) else {
            return;
        };
        let held = snap.allocs.iter().filter(|a| a.weight().is_some()).count() as u64;
        let capped = match p.usdt_capped {
            false => held >= cap,
            true => held > cap - cap / 8,
        };
        if capped == p.usdt_capped {
            return;
        }
        match self.tracer.cap_usdt(pid, capped) {
            Ok(()) => {
                p.usdt_capped = capped;
                if capped && !p.usdt_cap_said {
                    p.usdt_cap_said = true;
                    eprintln!(
                        "bridge-trace: {} (pid {pid}) holds {held} live samples, its cap \
                         (--max-samples): its new samples are counted and dropped while it \
                         holds that many",
                        p.name
                    );
                }
            }
            Err(e) => tracing::warn!(pid, "capping its samples: {e}"),
        }
    }

    /// Closes one window for every process, then lets the governor keep the cost in budget.
    fn window(&mut self) -> Result<(metrics::TracerSample, Vec<metrics::Sample>)> {
        self.windows += 1;
        let mut samples = Vec::new();
        let mut growing: Option<f64> = None;
        let mut named = false;
        let pids: Vec<u32> = self.procs.keys().copied().collect();
        for pid in pids {
            let snap = match self.procs[&pid].snapshot(&self.tracer, pid) {
                Ok(snap) => snap,
                Err(e) => {
                    tracing::warn!(pid, "snapshot failed: {e}");
                    continue;
                }
            };
            self.cap_samples(pid, &snap);
            let traced = self.tracer.traces_allocator(pid);
            let held = if traced {
                collect::held_by_stack(&self.tracer, pid).unwrap_or_default()
            } else {
                Vec::new()
            };
            let p = self.procs.get_mut(&pid).expect("listed above");
            let at = p.started.elapsed().as_secs_f64();
            p.timeline.tick(at, target::rss_bytes(pid), held);
            let (sample, alerts) =
                process_window(pid, p, &snap, self.config, traced, self.window_length);
            for a in &alerts {
                p.timeline
                    .event(at, format!("alert: {} ({})", a.site, a.reason));
            }
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
        self.governor.measure(&programs, &self.tracer.hit_classes());
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
                + c.usdt_capped
                + c.inflight_full
                + c.lost_returns
                + c.growth_map_full
                + programs.iter().map(|p| p.missed_runs).sum::<u64>(),
            // Every process reporting its own samples: the governor's tier is not theirs.
            tier: if !self.procs.is_empty() && self.procs.values().all(|p| p.usdt.is_some()) {
                USDT_TIER
            } else {
                self.governor.tier.name()
            },
            sample_interval_bytes: self.governor.interval,
            overhead: self.governor.overhead,
            overhead_budget: self.governor.budget(),
            tier_changes: self.governor.changes,
            exports: self.exports.iter().map(|e| e.sample()).collect(),
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
        for p in self.procs.values_mut() {
            let at = p.started.elapsed().as_secs_f64();
            p.timeline.event(
                at,
                format!("tier {}: {}", change.tier.name(), change.reason),
            );
        }
        for (&pid, p) in self.procs.iter_mut().filter(|(_, p)| p.usdt.is_none()) {
            match change.tier {
                Tier::Growth => {
                    self.tracer.untrace_allocator(pid);
                    p.allocs = Sites::default();
                }
                Tier::Sampled | Tier::Full if !self.tracer.traces_allocator(pid) => {
                    match self.tracer.trace_allocator(pid, &p.allocators) {
                        Ok(()) => self.tracer.note_allocator_text(pid, &p.maps.current),
                        Err(e) => eprintln!("bridge-trace: pid {pid}: {e}"),
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes a snapshot of every process to --out-dir and hands it to each exporter.
    fn snapshots(&mut self) {
        for (&pid, p) in &self.procs {
            let snap = match p.snapshot(&self.tracer, pid) {
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
            let until = std::time::SystemTime::now();
            let from = until - self.config.snapshot_every;
            let (labels, attributes) = p
                .cgroup
                .as_ref()
                .map(|c| (c.labels(), c.attributes()))
                .unwrap_or_default();
            for e in self.exports {
                let payload = match e.kind {
                    export::Kind::Pyroscope => {
                        push::payload(&e.url, &p.name, pid, &labels, &r, from, until)
                    }
                    export::Kind::Otlp => Ok(export::otlp_payload(&e.url, &r, until, &attributes)),
                };
                match payload {
                    Ok(payload) => e.offer(payload),
                    Err(err) => eprintln!("bridge-trace: {err}"),
                }
            }
        }
    }
}

/// The report of one snapshot: live allocations when they are traced, else the stacks that
/// touched new memory (growth tier), weighted by the bytes they touched.
fn report(pid: u32, p: &Proc, snap: &Snapshot, governor: &Governor) -> Report {
    let view;
    let tier = p.tier(governor);
    let (snap, interval) = if tier == Tier::Growth {
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
            // The growth tier reports touched pages, mapped regions included; no allocation
            // is seen.
            regions: Vec::new(),
            allocated: Vec::new(),
            ..snap.clone()
        };
        (&view, None)
    } else {
        // Regions the program mapped itself, not those its allocators map for their blocks.
        let mut own = snap.clone();
        let allocators: Vec<String> = p.allocators.iter().map(|a| a.path.clone()).collect();
        keep_own_mappings(&mut own, &p.maps, &allocators);
        view = own;
        let sampled = tier == Tier::Sampled && governor.interval > 0;
        (&view, sampled.then_some(governor.interval))
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
        tier: Some(tier.name().into()),
        wrappers: p.wrappers.clone(),
        verdicts: p
            .named
            .values()
            .map(|s| {
                format!(
                    "leaking: {} holds ~{} in ~{} allocations (named while sampling)",
                    s.label,
                    human_bytes(s.bytes),
                    s.count
                )
            })
            .collect(),
        ..Meta::default()
    }
    .on_this_machine();
    let capture = Capture::new(snap, &p.maps, None, meta).with_timeline(
        &p.timeline.timeline(),
        snap,
        &p.maps,
    );
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
    crate::target::rss_bytes(pid).unwrap_or(0)
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
    /// A process that samples its own heap and reports it through the `otel_memory` USDT
    /// contract (bridge-trace's preloadable sampler, or any other): its samples and their
    /// frees only, the cheapest with allocation stacks. Chosen per process, never by --tier.
    #[value(skip)]
    Usdt,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Growth => "growth",
            Tier::Sampled => "sampled",
            Tier::Full => "full",
            Tier::Usdt => USDT_TIER,
        }
    }
}
