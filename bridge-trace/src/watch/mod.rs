//! `watch`: traces a running service for as long as it runs and, window after window, tells
//! which call sites leak ([`classify`]), exports it all as Prometheus metrics ([`metrics`]) and
//! says so on stderr when a site starts leaking or grows past `--alert-growth`. It reuses the
//! record pipeline's stages: attach, collect, symbolize.
pub mod bundle;
pub mod classify;
pub mod metrics;
pub mod view;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpListener, signal::unix::Signal};

use crate::{
    aggregate::{aggregate, Meta, Report, REPORT_VERSION},
    attach::check_privileges,
    cli::{WatchConfig, WatchTarget},
    collect::{self, Snapshot},
    error::{Error, Result},
    record::{self, utc_now, Attached},
    report::human_bytes,
    symbolize::{Blazesym, Frame, Symbolize as _},
    target,
};
use classify::{Class, Trend, Window, LEAK_WINDOWS, OLD_AFTER_WINDOWS};

/// How often the target's memory maps are re-read (for libraries it loads).
const MAPS_REFRESH: Duration = Duration::from_millis(200);
/// A site that has held nothing for this many windows is forgotten.
const FORGET_AFTER_WINDOWS: usize = 60;

/// Runs a `watch` until the duration, Ctrl-C/SIGTERM, or the process's exit.
pub fn run(config: &WatchConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    rt.block_on(run_async(config))
}

/// What a watch keeps between windows.
struct State {
    started: Instant,
    windows: u64,
    trends: HashMap<String, Trend>,
    /// Windows since each site last held memory.
    idle: HashMap<String, usize>,
    /// Label of every stack seen (by stack id; 0 = stored without its stack, by return address).
    labels: HashMap<(u64, u64), String>,
    flagged: HashSet<String>,
    alerted: HashSet<String>,
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
        tokio::spawn(metrics::serve(listener, metrics_rx));
    }
    let mut stop = Stop {
        signals: record::stop_signals()?,
        deadline: config.duration.map(|d| tokio::time::Instant::now() + d),
    };
    loop {
        let pid = match &config.target {
            WatchTarget::Pid(pid) => *pid,
            WatchTarget::Exe(exe) => match wait_for(exe, &mut stop).await {
                Some(pid) => pid,
                None => return Ok(()),
            },
        };
        let t = match attach(pid, config).await {
            Ok(t) => t,
            // It exited meanwhile: wait for the next one.
            Err(Error::ExitedBeforeAttach(_) | Error::NoSuchProcess(_))
                if matches!(config.target, WatchTarget::Exe(_)) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        match watch_process(t, config, &metrics_tx, &mut stop).await? {
            Ended::Stopped => return Ok(()),
            Ended::Exited if matches!(config.target, WatchTarget::Exe(_)) => {
                eprintln!("bridge-trace: waiting for the next process of the executable");
            }
            Ended::Exited => return Ok(()),
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

/// The first process running `exe`, polled every 200 ms; None when the watch must stop first.
async fn wait_for(exe: &std::path::Path, stop: &mut Stop) -> Option<u32> {
    let mut said = false;
    loop {
        if let Some(&pid) = target::processes_of(exe).first() {
            return Some(pid);
        }
        if !said {
            eprintln!(
                "bridge-trace: no process runs {} yet: waiting",
                exe.display()
            );
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait() => return None,
        }
    }
}

/// Attaches to `pid`; a process that has only just started (its loader has not mapped the
/// allocator yet) is given a few tries.
async fn attach(pid: u32, config: &WatchConfig) -> Result<Attached> {
    let mut tries = 0;
    loop {
        match record::attach_pid(pid, &config.trace) {
            Err(Error::NoAllocator { .. }) if tries < 10 && target::alive(pid) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Why watching one process ended.
enum Ended {
    Stopped,
    Exited,
}

/// Watches one process until it exits or the watch stops.
async fn watch_process(
    mut t: Attached,
    config: &WatchConfig,
    metrics_tx: &tokio::sync::watch::Sender<Arc<String>>,
    stop: &mut Stop,
) -> Result<Ended> {
    eprintln!(
        "bridge-trace: watching {} (pid {}) through {} [tier {}], a window every {}{}",
        t.name,
        t.pid,
        t.allocator,
        config.tier.name(),
        humantime::format_duration(config.interval),
        match config.metrics_addr {
            Some(addr) => format!(", metrics on http://{addr}/metrics"),
            None => String::new(),
        }
    );
    let mut refresh = tokio::time::interval(MAPS_REFRESH);
    let mut windows = tokio::time::interval_at(
        tokio::time::Instant::now() + config.interval,
        config.interval,
    );
    let mut snapshots = tokio::time::interval_at(
        tokio::time::Instant::now() + config.snapshot_every,
        config.snapshot_every,
    );
    let mut state = State {
        started: Instant::now(),
        windows: 0,
        trends: HashMap::new(),
        idle: HashMap::new(),
        labels: HashMap::new(),
        flagged: HashSet::new(),
        alerted: HashSet::new(),
    };
    loop {
        tokio::select! {
            _ = stop.wait() => return Ok(Ended::Stopped),
            r = async { t.pidfd.as_ref().unwrap().readable().await }, if t.pidfd.is_some() => {
                let _ = r;
                eprintln!("bridge-trace: pid {} exited", t.pid);
                return Ok(Ended::Exited);
            }
            c = async { t.unwinder.as_mut().unwrap().next_compiled().await }, if t.unwinder.is_some() => {
                t.table_compiled(c)?;
            }
            _ = refresh.tick() => {
                t.refresh_maps()?;
            }
            _ = windows.tick() => {
                let snapshot = collect::snapshot(&t.tracer, t.pid)?;
                let (sample, alerts) = window(&t, &snapshot, config, &mut state);
                let _ = metrics_tx.send(Arc::new(metrics::encode_sample(&sample)));
                if let Some(rows) = config.view_rows {
                    view::show(&sample, &t.name, state.started.elapsed(), rows);
                }
                if !alerts.is_empty() {
                    raise(&t, &snapshot, config, &state, &alerts);
                }
            }
            _ = snapshots.tick(), if config.out_dir.is_some() => {
                let snapshot = collect::snapshot(&t.tracer, t.pid)?;
                snapshot_bundle(&t, &snapshot, config, &state);
            }
        }
    }
}

/// Bytes, counts and ages per stack in one snapshot.
#[derive(Clone, Copy, Default)]
struct Held {
    bytes: u64,
    count: u64,
    old_bytes: u64,
    old_count: u64,
    oldest_ns: u64,
}

/// A site that just started leaking, or grows past `--alert-growth`.
struct Alert {
    site: String,
    /// `leaking` or `growth`.
    reason: &'static str,
    /// The line logged.
    line: String,
}

/// Closes one window: per-site windows, classes, log lines, alerts, and the metrics sample.
fn window(
    t: &Attached,
    snap: &Snapshot,
    config: &WatchConfig,
    state: &mut State,
) -> (metrics::Sample, Vec<Alert>) {
    let mut alerts = Vec::new();
    state.windows += 1;
    let at_secs = state.started.elapsed().as_secs_f64();
    let old_ns = (config.interval.as_secs_f64() * OLD_AFTER_WINDOWS * 1e9) as u64;
    let mut by_stack: HashMap<(u64, u64), Held> = HashMap::new();
    for a in &snap.allocs {
        let key = if a.stack_id != 0 {
            (a.stack_id, 0)
        } else {
            (0, a.ret_addr)
        };
        let h = by_stack.entry(key).or_default();
        let age = snap.taken_ns.saturating_sub(a.ts_ns);
        h.bytes += a.size;
        h.count += 1;
        if age >= old_ns {
            h.old_bytes += a.size;
            h.old_count += 1;
        }
        h.oldest_ns = h.oldest_ns.max(age);
    }
    label_new_stacks(t, snap, by_stack.keys(), &mut state.labels);

    let mut by_site: HashMap<String, Held> = HashMap::new();
    for (key, h) in &by_stack {
        let label = state
            .labels
            .get(key)
            .cloned()
            .unwrap_or_else(|| "[unknown]".into());
        let s = by_site.entry(label).or_default();
        s.bytes += h.bytes;
        s.count += h.count;
        s.old_bytes += h.old_bytes;
        s.old_count += h.old_count;
        s.oldest_ns = s.oldest_ns.max(h.oldest_ns);
    }
    let labels: HashSet<String> = state.trends.keys().chain(by_site.keys()).cloned().collect();
    let span = config.alert_window.as_secs_f64();
    let mut sites = Vec::new();
    for label in labels {
        let h = by_site.get(&label).copied().unwrap_or_default();
        let idle = state.idle.entry(label.clone()).or_default();
        *idle = if h.bytes == 0 { *idle + 1 } else { 0 };
        if *idle > FORGET_AFTER_WINDOWS {
            state.trends.remove(&label);
            state.idle.remove(&label);
            continue;
        }
        let trend = state.trends.entry(label.clone()).or_default();
        trend.push(Window {
            at_secs,
            bytes: h.bytes,
            count: h.count,
            old_bytes: h.old_bytes,
            old_count: h.old_count,
            oldest_age_secs: h.oldest_ns as f64 / 1e9,
        });
        let class = trend.class();
        let growth = trend.growth_rate(span);
        tracing::debug!(
            site = %label,
            bytes = h.bytes,
            old_count = h.old_count,
            oldest_secs = h.oldest_ns as f64 / 1e9,
            class = class.name(),
            "window"
        );
        if class == Class::Leaking && state.flagged.insert(label.clone()) {
            let line = format!(
                "bridge-trace: leak at {label}: holds {} in {} allocations; its allocations older \
                 than {OLD_AFTER_WINDOWS} windows piled up in the last {LEAK_WINDOWS} windows \
                 ({}/s)",
                human_bytes(h.bytes),
                h.count,
                human_bytes(growth.max(0.0) as u64)
            );
            eprintln!("{line}");
            alerts.push(Alert {
                site: label.clone(),
                reason: "leaking",
                line,
            });
        }
        if let Some(limit) = config.alert_growth {
            if class == Class::Leaking && growth >= limit && state.alerted.insert(label.clone()) {
                let line = format!(
                    "bridge-trace: ALERT: {label} grows {}/s over the last {}, above {}/s",
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
            bytes: h.bytes,
            count: h.count,
            old_bytes: h.old_bytes,
            growth_bytes_per_second: growth,
        });
    }
    // Leaking first, then fastest growing, then largest: the exported top sites.
    sites.sort_by(|a, b| {
        (b.class == Class::Leaking)
            .cmp(&(a.class == Class::Leaking))
            .then(
                b.growth_bytes_per_second
                    .total_cmp(&a.growth_bytes_per_second),
            )
            .then(b.bytes.cmp(&a.bytes))
            .then(a.label.cmp(&b.label))
    });
    let c = &snap.counters;
    let programs = t.tracer.program_costs();
    let sample = metrics::Sample {
        pid: t.pid,
        rss_bytes: rss_bytes(t.pid),
        outstanding_bytes: snap.allocs.iter().map(|a| a.size).sum(),
        allocs: c.allocs,
        frees: c.frees,
        dropped: c.map_full_drops
            + c.inflight_full
            + c.lost_returns
            + programs.iter().map(|p| p.missed_runs).sum::<u64>(),
        tier: config.tier.name(),
        windows: state.windows,
        bpf_cpu_seconds: programs.iter().map(|p| p.run_time_ns).sum::<u64>() as f64 / 1e9,
        tracer_cpu_seconds: own_cpu_seconds(),
        sites,
    };
    (sample, alerts)
}

/// The full report of one snapshot, as `record` would write it.
fn report(t: &Attached, snap: &Snapshot, state: &State) -> Report {
    let meta = Meta {
        version: REPORT_VERSION,
        target: t.name.clone(),
        pid: t.pid,
        duration_secs: state.started.elapsed().as_secs_f64(),
        target_exited: false,
        min_age_secs: None,
        allocator: t.allocator.clone(),
        counters: snap.counters,
        younger_than_min_age: 0,
        unwind: t.unwinder.as_ref().map(|u| u.summary()),
        programs: t.tracer.program_costs(),
    };
    aggregate(snap, &mut Blazesym::new(&t.maps), None, meta)
}

/// Writes an incident bundle for `alerts` (with --out-dir) and runs --on-alert for each.
fn raise(t: &Attached, snap: &Snapshot, config: &WatchConfig, state: &State, alerts: &[Alert]) {
    let stamp = utc_now();
    let bundle = config.out_dir.as_ref().and_then(|dir| {
        let text: Vec<&str> = alerts.iter().map(|a| a.line.as_str()).collect();
        let r = report(t, snap, state);
        match bundle::write(
            dir,
            &format!("incident-{stamp}"),
            &r,
            Some(&text.join("\n")),
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
            .env("BRIDGE_TRACE_PID", t.pid.to_string())
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

/// Writes a periodic snapshot to --out-dir and prunes the oldest.
fn snapshot_bundle(t: &Attached, snap: &Snapshot, config: &WatchConfig, state: &State) {
    let Some(dir) = &config.out_dir else {
        return;
    };
    let r = report(t, snap, state);
    let name = format!("snapshot-{}", utc_now());
    match bundle::write(dir, &name, &r, None) {
        Ok(_) => bundle::prune(dir, "snapshot-", config.keep),
        Err(e) => eprintln!("bridge-trace: {e}"),
    }
}

/// Names the stacks not seen before by their allocation site: the innermost frame of the
/// allocator's direct caller, `function (file:line)`.
fn label_new_stacks<'a>(
    t: &Attached,
    snap: &Snapshot,
    keys: impl Iterator<Item = &'a (u64, u64)>,
    labels: &mut HashMap<(u64, u64), String>,
) {
    let new: Vec<((u64, u64), u64)> = keys
        .filter(|k| !labels.contains_key(k))
        .map(|&k| {
            let leaf = match k {
                (0, ret) => ret,
                (id, _) => snap
                    .stacks
                    .get(&id)
                    .and_then(|s| s.frames.first().copied())
                    .unwrap_or(0),
            };
            (k, leaf)
        })
        .collect();
    if new.is_empty() {
        return;
    }
    let addrs: Vec<u64> = new.iter().map(|&(_, a)| a).collect();
    let named = Blazesym::new(&t.maps).symbolize(&addrs);
    for (key, addr) in new {
        let label = named
            .get(&addr)
            .and_then(|frames| frames.last())
            .map(site_label)
            .unwrap_or_else(|| "[unknown]".into());
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
