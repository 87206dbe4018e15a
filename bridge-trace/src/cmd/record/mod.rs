//! `record`: attach, trace until the duration ends, Ctrl-C / SIGTERM arrives or the target exits,
//! then snapshot → symbolize → aggregate → render, writing every requested output.
use std::{
    io::{IsTerminal as _, Write as _},
    os::fd::OwnedFd,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use tokio::{io::unix::AsyncFd, sync::mpsc};

mod config;

pub use config::{Config, Target};

use crate::{
    aggregate::{aggregate, Report},
    attach::{check_privileges, Knobs, TraceOptions, Tracer},
    capture::{self, keep_own_mappings, Capture},
    collect,
    error::{Error, Result},
    model::{
        maps::{read_maps, Mapping, ProcessMaps},
        meta::{Meta, Process, UnwindSummary, REPORT_VERSION},
        snapshot::Snapshot,
    },
    os::{pidfd_open, stop_signals, utc_now},
    output::{self, Destination},
    render::{self, Format, RenderOptions},
    symbolize::Blazesym,
    target::{self, EntryKind, Launched},
    units::human_bytes,
    unwind::{Compiled, Unwinder},
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
    /// The probes being detached (the kernel waits a grace period per uprobe, about 0.1 s
    /// each): the report is written already; [`Outcome::detached`] waits for the rest.
    detaching: Option<std::thread::JoinHandle<()>>,
}

impl Outcome {
    /// Waits until nothing of bridge-trace's stays in the kernel.
    pub fn detached(&mut self) {
        if let Some(d) = self.detaching.take() {
            let _ = d.join();
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.detached();
    }
}

/// How often held children (`--follow-children`) are looked for: each waits, stopped, until then.
const CHILDREN_POLL: Duration = Duration::from_millis(10);

/// A process the target forked, followed (`--follow-children`).
struct Followed {
    pid: u32,
    parent: u32,
    name: String,
    maps: ProcessMaps,
}

/// Follows the anonymous memory running process `pid` maps itself, through its libc.
fn trace_own_mappings(tracer: &mut Tracer, pid: u32, maps: &[Mapping]) -> Result<()> {
    match target::growth_object(pid, maps) {
        Some(object) => tracer.trace_growth(pid, &object, false),
        None => Ok(()),
    }
}

/// Attaches a held child's probes and lets it go. A child that cannot be followed is let go
/// too, and said.
fn follow(t: &mut Attached, child: u32, parent: u32, config: &Config) -> Option<Followed> {
    let quiet = config.quiet;
    let attached = (|| {
        let maps = read_maps(child)?;
        let allocators = target::allocators_of(child, &maps, &config.alloc_fns)?;
        t.tracer.trace_allocator(child, &allocators)?;
        trace_own_mappings(&mut t.tracer, child, &maps)?;
        if let Some(u) = t.unwinder.as_mut() {
            u.track(child, &maps)?;
        }
        Ok::<_, Error>(maps)
    })();
    t.tracer.release_child(child);
    let name = target::comm(child).unwrap_or_else(|| format!("pid{child}"));
    match attached {
        Ok(maps) => {
            if !quiet {
                eprintln!("bridge-trace: following {name} (pid {child}), forked by pid {parent}");
            }
            Some(Followed {
                pid: child,
                parent,
                name,
                maps: ProcessMaps::new(child, maps),
            })
        }
        Err(e) => {
            eprintln!("bridge-trace: not following pid {child} (forked by pid {parent}): {e}");
            None
        }
    }
}

/// Events about a launched child, from the thread that waits for it.
enum ChildEvent {
    Stopped(i32),
    Exited(i32),
}

/// Runs a `record` to completion.
pub fn run(config: &Config) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    rt.block_on(run_async(config))
}

/// A traced process: probes attached, its maps kept, its unwind tables fed.
pub(crate) struct Attached {
    pub(crate) pid: u32,
    pub(crate) name: String,
    pub(crate) tracer: Tracer,
    pub(crate) allocator: String,
    /// The executable, as the process saw it.
    pub(crate) exe: Option<String>,
    /// The allocators' objects, as the process saw them: what they map is theirs.
    pub(crate) allocator_paths: Vec<String>,
    pub(crate) maps: ProcessMaps,
    pub(crate) unwinder: Option<Unwinder>,
    child: Option<mpsc::UnboundedReceiver<ChildEvent>>,
    /// Readable once the process has exited (`--pid`).
    pub(crate) pidfd: Option<AsyncFd<OwnedFd>>,
}

impl Attached {
    /// Re-reads the process's maps and asks for the unwind tables of objects it has newly
    /// mapped. False once the process is gone.
    pub(crate) fn refresh_maps(&mut self) -> Result<bool> {
        if !self.maps.refresh() {
            return Ok(false);
        }
        if let Some(u) = self.unwinder.as_mut() {
            u.track(self.pid, &self.maps.current)?;
        }
        Ok(true)
    }

    /// Loads a table the builder finished (`None`: the builder is gone).
    pub(crate) fn table_compiled(&mut self, compiled: Option<Compiled>) -> Result<()> {
        if let (Some(c), Some(u)) = (compiled, self.unwinder.as_mut()) {
            u.loaded(c, self.pid, &self.maps.current)?;
        }
        Ok(())
    }
}

/// Attaches to the running process `pid` (`record --pid`, `watch`).
pub(crate) fn attach_pid(
    pid: u32,
    config: &TraceOptions,
    follow: bool,
    alloc_fns: &[(String, EntryKind)],
) -> Result<Attached> {
    let maps = target::inspect_pid(pid)?;
    let allocators = target::allocators_of(pid, &maps, alloc_fns)?;
    let mut tracer = Tracer::attach(
        &allocators,
        Knobs {
            tgid: pid,
            launched: false,
            max_allocs: config.max_allocs,
            unwind: config.unwind.mode(),
            follow_children: follow,
        },
    )?;
    if follow {
        tracer.follow_children()?;
    }
    trace_own_mappings(&mut tracer, pid, &maps)?;
    if !target::alive(pid) {
        return Err(Error::ExitedBeforeAttach(pid));
    }
    // The probes are live: tables are built in the background, and frames they do not cover
    // yet are walked with frame pointers (and counted).
    let mut unwinder = Unwinder::new(&mut tracer, config.unwind)?;
    if let Some(u) = unwinder.as_mut() {
        u.track(pid, &maps)?;
    }
    // SAFETY: the OwnedFd stays open, unchanged, for as long as the AsyncFd owns it.
    let pidfd = pidfd_open(pid).and_then(|fd| unsafe { AsyncFd::register(fd) }.ok());
    Ok(Attached {
        pid,
        name: target::comm(pid).unwrap_or_else(|| format!("pid{pid}")),
        tracer,
        allocator: target::describe(&allocators),
        allocator_paths: allocators.iter().map(|a| a.path.clone()).collect(),
        exe: target::exe(pid),
        maps: ProcessMaps::new(pid, maps),
        unwinder,
        child: None,
        pidfd,
    })
}

fn launch(argv: &[std::ffi::OsString], config: &Config) -> Result<Attached> {
    let program = target::resolve_program(&argv[0])?;
    let mut allocators = target::allocators_for_command(&program)?;
    allocators.extend(target::custom_allocators(
        &config.alloc_fns,
        &target::program_objects(&program),
    )?);
    let mut launched = Launched::spawn(&program, argv)?;
    let pid = launched.pid;
    let prepared = Tracer::attach(
        &allocators,
        Knobs {
            tgid: pid,
            launched: true,
            max_allocs: config.max_allocs,
            unwind: config.unwind.mode(),
            follow_children: config.follow_children,
        },
    )
    .and_then(|mut tracer| {
        if config.follow_children {
            tracer.follow_children()?;
        }
        let hold = target::hold_allocator(&allocators);
        tracer.trace_growth(pid, &hold.host_path, false)?;
        let unwinder = Unwinder::new(&mut tracer, config.unwind)?;
        if unwinder.is_some() {
            // Held once its libraries are mapped, and at each dlopen, to load their tables
            // before their code runs.
            tracer.attach_holds(&program, target::hold_allocator(&allocators), pid)?;
        }
        Ok((tracer, unwinder))
    });
    let (tracer, unwinder) = match prepared {
        Ok(t) => t,
        Err(e) => {
            drop(launched); // the child exits without running the program
            reap(pid);
            return Err(e);
        }
    };
    if let Err(e) = launched.release() {
        reap(pid);
        return Err(Error::Spawn {
            command: program.display().to_string(),
            reason: match e {
                Error::Spawn { reason, .. } => reason,
                other => other.to_string(),
            },
        });
    }
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || wait_child(pid, tx));
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "program".into());
    let maps = read_maps(pid).unwrap_or_default();
    Ok(Attached {
        pid,
        name,
        tracer,
        allocator: target::describe(&allocators),
        allocator_paths: allocators.iter().map(|a| a.path.clone()).collect(),
        exe: Some(program.to_string_lossy().into_owned()),
        maps: ProcessMaps::new(pid, maps),
        unwinder,
        child: Some(rx),
        pidfd: None,
    })
}

fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: plain syscall on our own child.
    unsafe { libc::waitpid(pid as i32, &mut status, 0) };
}

/// Waits for the launched child, reporting stops (the exit hold) and its exit.
fn wait_child(pid: u32, tx: mpsc::UnboundedSender<ChildEvent>) {
    loop {
        let mut status = 0;
        // SAFETY: plain syscall on our own child.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WUNTRACED) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            let _ = tx.send(ChildEvent::Exited(-1));
            return;
        }
        if libc::WIFSTOPPED(status) {
            let _ = tx.send(ChildEvent::Stopped(libc::WSTOPSIG(status)));
        } else if libc::WIFEXITED(status) {
            let _ = tx.send(ChildEvent::Exited(libc::WEXITSTATUS(status)));
            return;
        } else if libc::WIFSIGNALED(status) {
            let _ = tx.send(ChildEvent::Exited(128 + libc::WTERMSIG(status)));
            return;
        }
    }
}

async fn run_async(config: &Config) -> Result<Outcome> {
    check_privileges()?;
    let mut t = match &config.target {
        Target::Pid(pid) => attach_pid(
            *pid,
            &config.trace_options(),
            config.follow_children,
            &config.alloc_fns,
        )?,
        Target::Command(argv) => launch(argv, config)?,
    };
    let pid = t.pid;
    let show_status = !config.quiet && std::io::stderr().is_terminal();
    eprintln!(
        "bridge-trace: tracing {} (pid {pid}) through {}{}",
        t.name,
        t.tracer.attached.join(" and "),
        match config.duration {
            Some(d) => format!(" for {}", humantime::format_duration(d)),
            None => " until it exits or Ctrl-C".into(),
        }
    );

    let started = Instant::now();
    let started_at = SystemTime::now();
    let (mut sigint, mut sigterm) = stop_signals()?;
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let mut refresh = tokio::time::interval(MAPS_REFRESH);
    // A held child waits for this tick to be attached and let go.
    let mut held_children = tokio::time::interval(CHILDREN_POLL);
    let mut children: Vec<Followed> = Vec::new();
    let mut last_status = Instant::now();
    let mut last_allocs = 0u64;
    let mut exit_snapshot: Option<Snapshot> = None;
    let mut starts_released = 0u64;
    let mut target_status = None;

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
            _ = held_children.tick(), if config.follow_children => {
                for (child, parent) in t.tracer.held_children() {
                    children.extend(follow(&mut t, child, parent, config));
                }
            }
            _ = refresh.tick() => {
                t.refresh_maps()?;
                for c in &mut children {
                    if c.maps.refresh() {
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
    let elapsed = started.elapsed();

    let exited = stop == StopReason::TargetExited;
    let mut snapshot = match exit_snapshot {
        Some(s) => s,
        None => collect::snapshot(&t.tracer, pid)?,
    };
    // Counters keep counting until the very end (frees during atexit handlers, say).
    if let Ok(c) = collect::counters(&t.tracer) {
        snapshot.counters = c;
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
    let attached_symbols = t.tracer.attached.clone();
    // Detach every probe now, on a thread of its own: the kernel waits for a grace period per
    // uprobe (about 0.1 s each here), and the report need not wait for that.
    let tracer = t.tracer;
    let detaching = std::thread::spawn(move || drop(tracer));
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
        tier: Some("full".into()),
        ..Meta::default()
    }
    .on_this_machine();
    // What the allocators mapped for their own blocks is counted as those blocks.
    keep_own_mappings(&mut snapshot, &t.maps, &t.allocator_paths);
    for (c, snap) in children.iter().zip(child_snapshots.iter_mut()) {
        keep_own_mappings(snap, &c.maps, &t.allocator_paths);
    }
    // The report is rendered from the capture, as `bridge-trace report` renders it later.
    let capture = Capture::new(
        &snapshot,
        &t.maps,
        config.min_age.map(|d| d.as_nanos() as u64),
        meta,
    );
    let capture = if config.follow_children {
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
    let mut symbolizer = Blazesym::process(&t.maps);
    let report = aggregate(&capture, &mut symbolizer);

    let outputs = if config.outputs.is_empty() {
        vec![(
            default_output(&t.name, pid, config.default_format),
            config.default_format,
        )]
    } else {
        config.outputs.clone()
    };
    let options = RenderOptions { top: config.top };
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
        detaching: Some(detaching),
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
