//! The process a `record` traces: attached where it runs (`--pid`) or launched and held until
//! its probes are in place (`-- CMD`), its maps kept and its unwind tables fed; the children it
//! forks followed (`--follow-children`).
use std::{os::fd::OwnedFd, time::Duration};

use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::Config;
use crate::{
    attach::{Knobs, Tracer},
    error::{Error, Result},
    model::maps::{host_path, read_maps, Mapping, ProcessMaps, Refresh},
    os::pidfd_open,
    target::{self, Launched},
    unwind::{Compiled, Unwinder},
};

/// How often held children (`--follow-children`) are looked for: each waits, stopped, until then.
pub(super) const CHILDREN_POLL: Duration = Duration::from_millis(10);

/// A process the target forked, followed (`--follow-children`).
pub(super) struct Followed {
    pub(super) pid: u32,
    pub(super) parent: u32,
    pub(super) name: String,
    pub(super) maps: ProcessMaps,
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
pub(super) fn follow(
    t: &mut Attached,
    child: u32,
    parent: u32,
    config: &Config,
) -> Option<Followed> {
    let quiet = config.quiet;
    let attached = (|| {
        let maps = read_maps(child)?;
        let allocators = match target::allocators_of(child, &maps, &config.alloc_fns) {
            Ok(a) => a,
            // Held at its new image's first fault (it exec'ed), before the loader mapped its
            // libraries: the allocators it will load, as for a launched program.
            Err(e) => match target::exe(child) {
                Some(exe) => {
                    target::allocators_for_command(&host_path(child, &exe)).map_err(|_| e)?
                }
                None => return Err(e),
            },
        };
        // Its tables before its probes, while it is held.
        if let Some(u) = t.unwinder.as_mut() {
            u.load_all(child, &maps)?;
        }
        t.tracer.trace_allocator(child, &allocators)?;
        t.tracer.note_allocator_text(child, &maps);
        trace_own_mappings(&mut t.tracer, child, &maps)?;
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
pub(super) enum ChildEvent {
    Stopped(i32),
    Exited(i32),
}

/// A traced process: probes attached, its maps kept, its unwind tables fed.
pub(super) struct Attached {
    pub(super) pid: u32,
    pub(super) name: String,
    pub(super) tracer: Tracer,
    pub(super) allocator: String,
    /// The executable, as the process saw it.
    pub(super) exe: Option<String>,
    /// The allocators' objects, as the process saw them: what they map is theirs.
    pub(super) allocator_paths: Vec<String>,
    /// Traced through the otel_memory contract: the objects whose frames top each sample's
    /// stack (an interposing sampler's).
    pub(super) usdt: Option<Vec<String>>,
    /// The sampler was injected (`--inject`), sampling every this many bytes.
    pub(super) injected: Option<u64>,
    pub(super) maps: ProcessMaps,
    pub(super) unwinder: Option<Unwinder>,
    pub(super) child: Option<mpsc::UnboundedReceiver<ChildEvent>>,
    /// Readable once the process has exited (`--pid`).
    pub(super) pidfd: Option<AsyncFd<OwnedFd>>,
    /// The processes it forks are traced too (`--follow-children`, or a script).
    pub(super) follow_children: bool,
    /// When the probes went live (ages and the duration count from here).
    pub(super) since: (std::time::Instant, std::time::SystemTime),
}

impl Attached {
    /// Re-reads the process's maps and asks for the unwind tables of objects it has newly
    /// mapped. False once the process is gone.
    pub(super) fn refresh_maps(&mut self) -> Result<bool> {
        let before = self.injected.map(|_| self.maps.current.clone());
        match self.maps.refresh() {
            Refresh::Gone => return Ok(false),
            Refresh::Same => return Ok(true),
            Refresh::Changed => {}
        }
        if let (Some(mean), Some(before)) = (self.injected, before) {
            let now = &self.maps.current;
            if let Some(said) = target::inject::follow_new_code(self.pid, mean, &before, now) {
                eprintln!("bridge-trace: {said}");
            }
        }
        self.tracer
            .note_allocator_text(self.pid, &self.maps.current);
        if let Some(u) = self.unwinder.as_mut() {
            u.track(self.pid, &self.maps.current)?;
        }
        Ok(true)
    }

    /// Loads a table the builder finished (`None`: the builder is gone).
    pub(super) fn table_compiled(&mut self, compiled: Option<Compiled>) -> Result<()> {
        if let (Some(c), Some(u)) = (compiled, self.unwinder.as_mut()) {
            u.loaded(c, self.pid, &self.maps.current)?;
        }
        Ok(())
    }
}

/// Attaches to the running process `pid` (`record --pid`).
pub(super) fn attach_pid(pid: u32, config: &Config) -> Result<Attached> {
    let (follow, alloc_fns) = (config.follow_children, &config.alloc_fns);
    let maps = target::inspect_pid(pid)?;
    let allocators = target::allocators_of(pid, &maps, alloc_fns)?;
    let mut tracer = Tracer::load(Knobs {
        tgid: pid,
        launched: false,
        max_allocs: config.max_allocs,
        unwind: config.unwind.mode(),
        follow_children: follow,
    })?;
    // --inject: the sampler is loaded once the kernel half is ready, so that little of the
    // process's allocating goes by between its load and the probes on it.
    let (maps, injected) = match config.inject {
        Some(mean) => {
            let done = target::inject::inject(pid, mean)?;
            if !config.quiet {
                eprintln!("bridge-trace: {}", done.describe(pid));
            }
            // Preloaded, it samples as it was started to.
            (target::inspect_pid(pid)?, (!done.preloaded).then_some(mean))
        }
        None => (maps, None),
    };
    // The tables first, then the probes: no allocation is walked without them (frames of
    // objects mapped later are walked with frame pointers until theirs load, and counted).
    let mut unwinder = Unwinder::new(&mut tracer, config.unwind)?;
    if let Some(u) = unwinder.as_mut() {
        u.load_all(pid, &maps)?;
    }
    let since = (std::time::Instant::now(), std::time::SystemTime::now());
    let usdt = trace_usdt(&mut tracer, pid, &maps, config)?;
    if usdt.is_none() {
        tracer.trace_allocator(pid, &allocators)?;
        tracer.note_allocator_text(pid, &maps);
    }
    if follow {
        tracer.follow_children()?;
    }
    trace_own_mappings(&mut tracer, pid, &maps)?;
    if !target::alive(pid) {
        return Err(Error::ExitedBeforeAttach(pid));
    }
    // SAFETY: the OwnedFd stays open, unchanged, for as long as the AsyncFd owns it.
    let pidfd = pidfd_open(pid).and_then(|fd| unsafe { AsyncFd::register(fd) }.ok());
    let allocator = match &usdt {
        Some((_, line)) => line.clone(),
        None => target::describe(&allocators),
    };
    Ok(Attached {
        pid,
        name: target::comm(pid).unwrap_or_else(|| format!("pid{pid}")),
        tracer,
        allocator,
        usdt: usdt.map(|(interposers, _)| interposers),
        injected,
        allocator_paths: allocators.iter().map(|a| a.path.clone()).collect(),
        exe: target::exe(pid),
        maps: ProcessMaps::new(pid, maps),
        unwinder,
        child: None,
        pidfd,
        follow_children: follow,
        since,
    })
}

/// Traces `pid` through the otel_memory contract when it carries it (and `--no-usdt` was not
/// given): the objects whose frames top its samples' stacks, and the start line's words.
/// `None` when it does not, or its probes could not be attached (said; uprobes then).
fn trace_usdt(
    tracer: &mut Tracer,
    pid: u32,
    maps: &[Mapping],
    config: &Config,
) -> Result<Option<(Vec<String>, String)>> {
    if !config.usdt {
        return Ok(None);
    }
    let carriers = target::usdt::carriers(pid, maps);
    for line in target::usdt::skipped(&carriers) {
        eprintln!("bridge-trace: {line}");
    }
    if carriers.is_empty() {
        return Ok(None);
    }
    match tracer.trace_usdt(pid, &carriers) {
        Ok(sites) => Ok(Some((
            target::usdt::interposers(&carriers),
            target::usdt::describe(&carriers, sites),
        ))),
        Err(e @ (Error::ExitedBeforeAttach(_) | Error::NoSuchProcess(_))) => Err(e),
        Err(e) => {
            eprintln!("bridge-trace: pid {pid} carries the otel_memory probes, not used: {e}");
            tracer.untrace_allocator(pid);
            Ok(None)
        }
    }
}

pub(super) fn launch(argv: &[std::ffi::OsString], config: &Config) -> Result<Attached> {
    let program = target::resolve_program(&argv[0])?;
    // A script is run by its interpreter, and runs the programs it names: their allocators are
    // traced, and the processes it starts are followed.
    let script = target::script_of(&program)?;
    let elf = script
        .as_ref()
        .map_or(program.clone(), |s| s.interpreter.clone());
    let mut allocators = target::allocators_for_command(&elf)?;
    let mut objects = target::program_objects(&elf);
    for run in script.iter().flat_map(|s| &s.runs) {
        // Each program the script may run: its allocators too (a Go or static program it
        // names is left out, said at the start).
        match target::allocators_for_command(run) {
            Ok(more) => {
                for a in more {
                    if !allocators.iter().any(|b| b.path == a.path) {
                        allocators.push(a);
                    }
                }
            }
            Err(e) => eprintln!(
                "bridge-trace: not tracing what {} runs there: {e}",
                run.display()
            ),
        }
        objects.extend(target::program_objects(run));
    }
    allocators.extend(target::custom_allocators(&config.alloc_fns, &objects)?);
    let follow_children = config.follow_children || script.is_some();
    if let Some(s) = &script {
        eprintln!(
            "bridge-trace: {} is a script run by {}: tracing it{}, and every process it starts",
            program.display(),
            s.interpreter.display(),
            if s.runs.is_empty() {
                String::new()
            } else {
                format!(
                    " and what it runs ({})",
                    s.runs
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
    // --sampler: the library goes where the program (run as the sudo user) can load it.
    let sampler = match config.sampler {
        true => Some(target::sampler::install(&target::sampler::default_dir()?)?),
        false => None,
    };
    let env: Vec<(&str, std::ffi::OsString)> = sampler
        .iter()
        .map(|lib| {
            let preload = target::sampler::preload(lib, std::env::var_os("LD_PRELOAD"));
            ("LD_PRELOAD", preload)
        })
        .collect();
    // The objects that report through the otel_memory contract: the sampler's library, and
    // the program's own objects that carry it (not a script's: they run in other processes).
    let mut carriers = Vec::new();
    if let Some(lib) = &sampler {
        let shown = lib.to_string_lossy().into_owned();
        carriers.push(
            target::usdt::carrier(&shown, lib)
                .ok_or_else(|| Error::Ebpf(format!("{shown} carries no otel_memory probes")))?,
        );
    }
    if config.usdt && script.is_none() {
        carriers.extend(target::usdt::carriers_in(&objects));
    }
    for line in target::usdt::skipped(&carriers) {
        eprintln!("bridge-trace: {line}");
    }
    let mut launched = Launched::spawn(&program, argv, &env)?;
    let pid = launched.pid;
    let knobs = Knobs {
        tgid: pid,
        launched: true,
        max_allocs: config.max_allocs,
        unwind: config.unwind.mode(),
        follow_children,
    };
    let mut usdt = None;
    let prepared = match carriers.is_empty() {
        true => Tracer::attach(&allocators, knobs),
        false => Tracer::load(knobs).and_then(|mut tracer| {
            let sites = tracer.trace_usdt(pid, &carriers)?;
            usdt = Some((
                target::usdt::interposers(&carriers),
                target::usdt::describe(&carriers, sites),
            ));
            // The allocator's own entry points stay unprobed; only the hold at `_exit`.
            let hold = target::hold_allocator(&allocators);
            let exit_only = target::Allocator {
                entries: Vec::new(),
                aliases: Vec::new(),
                ..hold.clone()
            };
            tracer.trace_allocator(pid, &[exit_only])?;
            Ok(tracer)
        }),
    }
    .and_then(|mut tracer| {
        if follow_children {
            tracer.follow_children()?;
        }
        let hold = target::hold_allocator(&allocators);
        tracer.trace_growth(pid, &hold.host_path, false)?;
        let unwinder = Unwinder::new(&mut tracer, config.unwind)?;
        if unwinder.is_some() {
            // Held once its libraries are mapped, and at each dlopen, to load their tables
            // before their code runs.
            tracer.attach_holds(&elf, target::hold_allocator(&allocators), pid)?;
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
    let since = (std::time::Instant::now(), std::time::SystemTime::now());
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
    let allocator = match &usdt {
        Some((_, line)) if sampler.is_some() => format!("{line}, the sampler preloaded"),
        Some((_, line)) => line.clone(),
        None => target::describe(&allocators),
    };
    Ok(Attached {
        pid,
        name,
        tracer,
        allocator,
        usdt: usdt.map(|(interposers, _)| interposers),
        injected: None,
        allocator_paths: allocators.iter().map(|a| a.path.clone()).collect(),
        exe: Some(program.to_string_lossy().into_owned()),
        maps: ProcessMaps::new(pid, maps),
        unwinder,
        child: Some(rx),
        pidfd: None,
        follow_children,
        since,
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
