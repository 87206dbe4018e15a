//! `record`: attach, trace until the duration ends, Ctrl-C / SIGTERM arrives or the target exits,
//! then snapshot → symbolize → aggregate → render, writing every requested output.
use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

mod config;
mod over_time;
mod session;

pub use config::{Config, Target};

use over_time::OverTime;
use session::{attach_pid, follow, launch, Attached, ChildEvent, Followed, CHILDREN_POLL};

use crate::target::sampler::DEFAULT_INTERVAL;
use crate::{
    aggregate::{aggregate, Report},
    attach::check_privileges,
    capture::{self, keep_own_mappings, Capture},
    collect,
    error::{Error, Result},
    model::{
        maps::Refresh,
        meta::{Meta, Process, UnwindSummary, REPORT_VERSION, USDT_TIER},
        sites::Wrappers,
        snapshot::Snapshot,
    },
    os::{stop_signals, utc_now},
    output::{self, Destination},
    render::{self, Format, RenderOptions},
    symbolize::{Blazesym, Debuginfod},
    units::human_bytes,
};

/// How often the target's memory maps are re-read (to keep libraries it loads and unloads).
const MAPS_REFRESH: Duration = Duration::from_millis(200);
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Why recording stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Duration,
    Interrupted,
    TargetExited,
}

/// The result of a `record`.
pub struct Outcome {
    pub report: Report,
    pub written: Vec<(PathBuf, Format)>,
    /// The raw capture written beside them.
    pub capture: Option<PathBuf>,
    pub stop: StopReason,
    /// Exit status of a launched target, when it exited.
    pub target_status: Option<i32>,
    /// Modules whose debug file debuginfod did not give: (module, why).
    pub not_fetched: Vec<(String, String)>,
    /// The probes being detached (the kernel waits a grace period per link, about 0.1 s,
    /// shared by multi-uprobe links, one after another for perf-event uprobes): the report is
    /// written already; [`Outcome::detached`] waits for the rest.
    detaching: Option<std::thread::JoinHandle<()>>,
    /// Probes being detached, and how long that takes about, in seconds.
    probes: usize,
    detach_s: f64,
}

impl Outcome {
    /// Waits until nothing of bridge-trace's stays in the kernel, saying so when that takes
    /// a while.
    pub fn detached(&mut self) {
        if let Some(d) = self.detaching.take() {
            if !d.is_finished() && self.probes > 0 {
                eprintln!(
                    "bridge-trace: report written; detaching {} probes from the process \
                     (about {:.1} s)...",
                    self.probes, self.detach_s
                );
            }
            let _ = d.join();
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.detached();
    }
}

/// Runs a `record` to completion.
pub fn run(config: &Config) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    rt.block_on(run_async(config))
}

async fn run_async(config: &Config) -> Result<Outcome> {
    check_privileges()?;
    // Its cache directory is made now: a bad one is said before anything is traced.
    let debuginfod = config
        .debuginfod
        .as_ref()
        .map(Debuginfod::new)
        .transpose()?;
    // Ctrl-C and SIGTERM are ours from the start: one that arrives while the program is
    // being launched or held for its tables ends the recording once it runs, never
    // bridge-trace half-way with the program stopped.
    let (mut sigint, mut sigterm) = stop_signals()?;
    let mut t = match &config.target {
        Target::Pid(pid) => attach_pid(*pid, config)?,
        Target::Command(argv) => launch(argv, config)?,
    };
    let pid = t.pid;
    let show_status = !config.quiet && std::io::stderr().is_terminal();
    eprintln!(
        "bridge-trace: tracing {} (pid {pid}) through {}{}",
        t.name,
        match t.usdt {
            Some(_) => t.allocator.clone(),
            None => t.tracer.attached.join(" and "),
        },
        match config.duration {
            Some(d) => format!(" for {}", humantime::format_duration(d)),
            None => " until it exits or Ctrl-C".into(),
        }
    );
    if config.verbose {
        for e in &t.tracer.entry_points {
            eprintln!("bridge-trace: probed {e}");
        }
    }

    let (started, started_at) = t.since;
    let deadline = config
        .duration
        .map(|d| tokio::time::Instant::from_std(started) + d);
    let mut refresh = tokio::time::interval(MAPS_REFRESH);
    // A held child waits for this tick to be attached and let go.
    let mut held_children = tokio::time::interval(CHILDREN_POLL);
    let mut children: Vec<Followed> = Vec::new();
    let mut last_status = Instant::now();
    let mut last_allocs = 0u64;
    let mut exit_snapshot: Option<Snapshot> = None;
    let mut starts_released = 0u64;
    let mut target_status = None;
    // The timeline's ticks and the classification windows, from the probes' start.
    let skip = t
        .usdt
        .as_ref()
        .map(|i| t.maps.text_of(i))
        .unwrap_or_default();
    let mut over = OverTime::new(config.duration, skip);
    let start = tokio::time::Instant::from_std(started);
    let mut ticks = tokio::time::interval_at(start, over.tick_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut windows = tokio::time::interval_at(start + over.window_every, over.window_every);
    windows.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let stop = loop {
        tokio::select! {
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {
                break StopReason::Duration;
            }
            _ = sigint.recv() => break StopReason::Interrupted,
            _ = sigterm.recv() => break StopReason::Interrupted,
            ev = async { t.child.as_mut().unwrap().recv().await }, if t.child.is_some() => {
                match ev {
                    Some(ChildEvent::Stopped(sig)) => {
                        let c = collect::counters(&t.tracer).unwrap_or_default();
                        if sig == libc::SIGSTOP && c.start_stops > starts_released {
                            // Held at its start or at a dlopen: new objects are mapped, their
                            // code has not run. Load their tables, then let it go.
                            starts_released = c.start_stops;
                            t.maps.refresh();
                            t.tracer.note_allocator_text(pid, &t.maps.current);
                            if let Some(u) = t.unwinder.as_mut() {
                                let started = Instant::now();
                                u.load_now(pid, &t.maps.current).await?;
                                tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "unwind tables loaded while held");
                            }
                            // SAFETY: plain syscall; resumes our own child.
                            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                            continue;
                        }
                        let held = c.exit_stops;
                        if sig == libc::SIGSTOP && held > 0 && exit_snapshot.is_none() {
                            // Held at _exit: everything it will never free is in the maps now.
                            t.maps.refresh();
                            exit_snapshot = Some(collect::snapshot(&t.tracer, pid)?);
                            over.event(started.elapsed().as_secs_f64(), "held at its exit");
                            // SAFETY: plain syscall; resumes our own child towards its exit.
                            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                        }
                    }
                    Some(ChildEvent::Exited(code)) => {
                        target_status = Some(code);
                        break StopReason::TargetExited;
                    }
                    None => break StopReason::TargetExited,
                }
            }
            r = async { t.pidfd.as_ref().unwrap().readable().await }, if t.pidfd.is_some() => {
                let _ = r;
                break StopReason::TargetExited;
            }
            c = async { t.unwinder.as_mut().unwrap().next_compiled().await }, if t.unwinder.is_some() => {
                t.table_compiled(c)?;
            }
            _ = held_children.tick(), if t.follow_children => {
                for (child, parent) in t.tracer.held_children() {
                    let before = children.len();
                    children.extend(follow(&mut t, child, parent, config));
                    if children.len() > before {
                        let what = format!("child {child} of {parent} followed");
                        over.event(started.elapsed().as_secs_f64(), what);
                    }
                }
            }
            _ = ticks.tick(), if exit_snapshot.is_none() => {
                over.tick(&t.tracer, pid, started.elapsed().as_secs_f64());
            }
            _ = windows.tick(), if exit_snapshot.is_none() => {
                match collect::snapshot(&t.tracer, pid) {
                    Ok(s) => {
                        if let Some(every) = over.window(&s, started.elapsed().as_secs_f64()) {
                            windows = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                            windows.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                    }
                    Err(e) => tracing::debug!(%e, "classification window"),
                }
            }
            _ = refresh.tick() => {
                t.refresh_maps()?;
                for c in &mut children {
                    if c.maps.refresh() == Refresh::Changed {
                        if let Some(u) = t.unwinder.as_mut() {
                            u.track(c.pid, &c.maps.current)?;
                        }
                    }
                }
                if show_status && last_status.elapsed() >= STATUS_EVERY {
                    if let Ok(s) = collect::status(&t.tracer, pid) {
                        let rate = (s.counters.allocs - last_allocs.min(s.counters.allocs)) as f64
                            / last_status.elapsed().as_secs_f64();
                        last_allocs = s.counters.allocs;
                        eprint!(
                            "\r\x1b[K{:>6.1}s  {:>9.0} allocs/s  outstanding {}  dropped {}  ",
                            started.elapsed().as_secs_f64(),
                            rate,
                            human_bytes(s.outstanding_bytes.max(0) as u64),
                            s.counters.map_full_drops + s.counters.inflight_full,
                        );
                    }
                    last_status = Instant::now();
                }
            }
        }
    };
    if show_status {
        eprint!("\r\x1b[K");
        let _ = std::io::stderr().flush();
    }
    if stop != StopReason::TargetExited && t.child.is_some() {
        // A launched program may be held (at its start, a dlopen or its exit) when the
        // recording stops: it runs on, and is let go again once the probes are gone.
        continue_process(pid);
    }
    let traced = Traced {
        stop,
        target_status,
        elapsed: started.elapsed(),
        started_at,
    };
    finish(t, children, exit_snapshot, over, traced, config, debuginfod)
}

/// Resumes `pid` if it is stopped (harmless if it runs).
fn continue_process(pid: u32) {
    // SAFETY: plain syscall on the process we launched.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

/// How a recording ended.
struct Traced {
    stop: StopReason,
    target_status: Option<i32>,
    elapsed: Duration,
    started_at: SystemTime,
}

/// Reads what the target (and each child followed) never freed, lets the probes go, and
/// renders and writes every output from the capture, as `bridge-trace report` does later.
fn finish(
    mut t: Attached,
    mut children: Vec<Followed>,
    exit_snapshot: Option<Snapshot>,
    mut over: OverTime,
    traced: Traced,
    config: &Config,
    debuginfod: Option<Debuginfod>,
) -> Result<Outcome> {
    let Traced {
        stop,
        target_status,
        elapsed,
        started_at,
    } = traced;
    let pid = t.pid;
    let exited = stop == StopReason::TargetExited;
    let at_end = elapsed.as_secs_f64();
    let mut snapshot = match exit_snapshot {
        Some(s) => s,
        None => {
            // The last point of the timeline, as the last snapshot sees it.
            over.tick(&t.tracer, pid, at_end);
            collect::snapshot(&t.tracer, pid)?
        }
    };
    // Counters keep counting until the very end (frees during atexit handlers, say).
    if let Ok(c) = collect::counters(&t.tracer) {
        snapshot.counters = c;
    }
    // The injected library stays: at the interval the next tracer expects of it, not at
    // every allocation (one more stop of about a millisecond).
    if t.injected.is_some_and(|m| m != DEFAULT_INTERVAL) && !exited {
        if let Err(e) = crate::target::inject::inject(pid, DEFAULT_INTERVAL) {
            eprintln!("bridge-trace: leaving the sampler at its default interval: {e}");
        }
    }
    // Children held just now are let go untraced; the others' allocations are read while their
    // probes are still attached.
    for (child, _) in t.tracer.held_children() {
        t.tracer.release_child(child);
    }
    let mut child_snapshots = Vec::with_capacity(children.len());
    for c in &mut children {
        c.maps.refresh();
        child_snapshots.push(collect::snapshot(&t.tracer, c.pid)?);
    }
    let programs = t.tracer.program_costs();
    snapshot.counters.missed_probe_runs = programs.iter().map(|p| p.missed_runs).sum();
    let attached_symbols = t.tracer.entry_points.clone();
    // Detach every probe now, on a thread of its own: the kernel waits for grace periods
    // (about 0.1 s each here), and the report need not wait for that.
    let probes = t.tracer.probe_count();
    let detach_s = if t.tracer.multi_links() {
        0.2
    } else {
        // The kernel unregisters perf-event uprobes one at a time, a grace period each.
        0.1 * t.tracer.link_count() as f64
    };
    let tracer = t.tracer;
    let launched_running = !exited && t.child.is_some();
    let detaching = std::thread::spawn(move || {
        drop(tracer);
        if launched_running {
            continue_process(pid);
        }
    });
    if !exited {
        t.maps.refresh();
    }
    tracing::debug!(
        ?attached_symbols,
        allocs = snapshot.allocs.len(),
        "snapshot taken"
    );

    let meta = Meta {
        version: REPORT_VERSION,
        target: match &config.target {
            Target::Pid(_) => t.name.clone(),
            Target::Command(argv) => argv
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
        },
        pid,
        duration_secs: elapsed.as_secs_f64(),
        target_exited: exited,
        min_age_secs: config.min_age.map(|d| d.as_secs_f64()),
        allocator: t.allocator.clone(),
        counters: snapshot.counters,
        younger_than_min_age: 0,
        programs,
        sample_interval: None,
        unwind: Some(match &t.unwinder {
            Some(u) => u.summary(),
            None => UnwindSummary {
                mode: config.unwind.name().into(),
                ..UnwindSummary::default()
            },
        }),
        exe: t.exe.clone(),
        started: Some(humantime::format_rfc3339_seconds(started_at).to_string()),
        tier: Some(if t.usdt.is_some() { USDT_TIER } else { "full" }.into()),
        wrappers: Wrappers::new(config.wrappers.clone()),
        entry_points: attached_symbols.clone(),
        injected: t.injected,
        declared_suppressions: declared_suppressions(pid, t.exe.as_deref()),
        ..Meta::default()
    }
    .on_this_machine();
    // What the allocators mapped for their own blocks is counted as those blocks.
    keep_own_mappings(&mut snapshot, &t.maps, &t.allocator_paths);
    if let Some(interposers) = &t.usdt {
        snapshot.drop_leading_frames(&t.maps.text_of(interposers));
    }
    for (c, snap) in children.iter().zip(child_snapshots.iter_mut()) {
        keep_own_mappings(snap, &c.maps, &t.allocator_paths);
    }
    // The report is rendered from the capture, as `bridge-trace report` renders it later.
    let (timeline, classes) = over.finish(&snapshot, at_end);
    let capture = Capture::new(
        &snapshot,
        &t.maps,
        config.min_age.map(|d| d.as_nanos() as u64),
        meta,
    )
    .with_timeline(&timeline, &snapshot, &t.maps)
    .with_classes(|a| classes.of(&snapshot, a), &snapshot, &t.maps);
    let capture = if t.follow_children {
        let parts = children
            .iter()
            .zip(&child_snapshots)
            .map(|(c, snap)| {
                let process = Process {
                    pid: c.pid,
                    name: c.name.clone(),
                    parent: Some(c.parent),
                    mappings: Vec::new(),
                };
                let min_age = config.min_age.map(|d| d.as_nanos() as u64);
                (
                    process,
                    Capture::new(snap, &c.maps, min_age, capture.meta.clone()),
                )
            })
            .collect();
        capture.with_children(&t.name, parts)
    } else {
        capture
    };
    let mut symbolizer = Blazesym::process(&t.maps).with_debuginfod(debuginfod);
    let mut report = aggregate(&capture, &mut symbolizer);
    crate::aggregate::suppress::apply_all(&mut report, &config.suppress, config.suppress_declared)
        .map_err(Error::Usage)?;

    let outputs = if config.outputs.is_empty() {
        vec![(
            default_output(&t.name, pid, config.default_format),
            config.default_format,
        )]
    } else {
        config.outputs.clone()
    };
    let options = RenderOptions {
        top: config.top,
        view: config.view,
    };
    // Render everything first, the capture too, then write: a failure leaves no partial set.
    let mut rendered = render::render_all(&report, &outputs, options)?;
    let capture_path = (!config.no_raw).then(|| beside(&outputs)).flatten();
    if let Some(path) = &capture_path {
        let bytes = capture
            .to_bytes()
            .map_err(|e| Error::io("encoding the raw capture", e))?;
        rendered.push((path.clone(), bytes));
    }
    output::write_all(&rendered, config.mode)?;
    Ok(Outcome {
        report,
        written: outputs,
        capture: capture_path,
        stop,
        target_status,
        not_fetched: symbolizer.not_fetched(),
        detaching: Some(detaching),
        probes,
        detach_s,
    })
}

/// What the program declares it suppresses, from its executable (the running one's, else the
/// path it was started from, as this process sees it through /proc/PID/root).
fn declared_suppressions(pid: u32, exe: Option<&str>) -> Option<String> {
    let running = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
    crate::target::declared_suppressions(&running).or_else(|| {
        let path = crate::model::maps::host_path(pid, exe?);
        crate::target::declared_suppressions(&path)
    })
}

/// `<program>-<pid>-<UTC time>.<ext>` in the current directory.
pub fn default_output(name: &str, pid: u32, format: Format) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(format!("{safe}-{pid}-{}.{}", utc_now(), format.extension()))
}

/// Where the raw capture of a recording goes: beside its first output written to a file, with
/// the capture's extension (`leaks.svg` → `leaks.btcap`). None when every output is a stream
/// (`-o -`, a FIFO) or that path is itself one of the outputs.
pub fn beside(outputs: &[(PathBuf, Format)]) -> Option<PathBuf> {
    let (first, format) = outputs
        .iter()
        .find(|(p, _)| output::destination(p) == Ok(Destination::File))?;
    let name = first.file_name()?.to_string_lossy();
    let stem = name
        .strip_suffix(&format!(".{}", format.extension()))
        .or_else(|| name.rsplit_once('.').map(|(stem, _)| stem))
        .unwrap_or(&name);
    let path = first.with_file_name(format!("{stem}.{}", capture::EXTENSION));
    (!outputs.iter().any(|(p, _)| *p == path)).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_output_names() {
        let p = default_output("data bridge", 42, Format::Svg);
        let s = p.to_str().unwrap();
        assert!(
            s.starts_with("data_bridge-42-") && s.ends_with(".svg"),
            "{s}"
        );
    }

    #[test]
    fn lies_beside_the_first_file_output() {
        let o = |p: &str, f| (PathBuf::from(p), f);
        let at = |outs: &[(PathBuf, Format)]| beside(outs).map(|p| p.display().to_string());
        assert_eq!(
            at(&[o("d/leaks.svg", Format::Svg)]).unwrap(),
            "d/leaks.btcap"
        );
        assert_eq!(at(&[o("p.pb.gz", Format::Pprof)]).unwrap(), "p.btcap");
        assert_eq!(at(&[o("noext", Format::Svg)]).unwrap(), "noext.btcap");
        assert_eq!(
            at(&[o("-", Format::Text), o("r.folded", Format::Folded)]).unwrap(),
            "r.btcap"
        );
        assert_eq!(at(&[o("-", Format::Text)]), None);
        assert_eq!(at(&[o("x.btcap", Format::Svg)]), None);
    }
}
