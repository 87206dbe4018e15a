//! `--inject`: loads bridge-trace's sampler ([`super::sampler`]) into a process that is
//! already running, so that it is traced at tier usdt without a restart. The process is
//! stopped briefly (every thread), one of its threads calls glibc's `dlopen` on the library
//! and then the library's `bridge_trace_sampler_attach`, which redirects the malloc family in
//! every loaded object's GOT ([`remote`] makes the calls), and it goes on.
//!
//! The calls are made by a helper process of bridge-trace's own (`/proc/self/exe`, in a
//! session of its own): a tracer killed in the middle of them, even by SIGKILL, does not take
//! with it the thread it was calling in, which the helper puts back. What stays behind in
//! the process is the library, idle (its semaphores zero once the tracer's probes are gone:
//! one load and a branch per call), and the GOT entries pointing at it; a second injection
//! finds it mapped and only calls the attach again.
//!
//! Refused, with the process untouched (exit code 5): a Go program, a static executable or
//! one whose libc is not glibc (no `dlopen` to call), a process already being traced,
//! `ptrace_scope` 3 or a seccomp filter, and a process whose every thread is inside the
//! allocator, the loader, or a fork or exec (tried again for half a second first).
mod remote;

use std::{
    fs,
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use object::{Object as _, ObjectSymbol as _};

use super::{allocators::is_libc_name, sampler};
use crate::{
    error::{Error, Result},
    model::maps::{host_path, read_maps, Mapping},
};

/// The hidden first argument that runs the helper ([`helper_main`]).
pub const HELPER_ARG: &str = "__inject-helper";

/// What an injection did.
#[derive(Clone, Debug)]
pub struct Injected {
    /// How long the process was stopped.
    pub stopped: Duration,
    /// GOT entries redirected to the library.
    pub rewritten: u64,
    /// The library was loaded by an earlier injection: not loaded again.
    pub again: bool,
    /// It was preloaded: the process goes through it already, nothing was changed.
    pub preloaded: bool,
}

impl Injected {
    /// The line bridge-trace says.
    pub fn describe(&self, pid: u32) -> String {
        format!(
            "injected the sampler into pid {pid}{}: stopped {:.1} ms, {} GOT entries redirected",
            match (self.preloaded, self.again) {
                (true, _) => " (preloaded: nothing to change)",
                (_, true) => " (loaded before)",
                _ => "",
            },
            self.stopped.as_secs_f64() * 1e3,
            self.rewritten
        )
    }
}

/// Loads the sampler into `pid` sampling every `mean` bytes (1: every allocation), or says why
/// not. Ready for tier usdt when it returns: the library is mapped and the process's malloc
/// family goes through it.
pub fn inject(pid: u32, mean: u64) -> Result<Injected> {
    let refuse = |reason: String| Error::Inject { pid, reason };
    let maps = super::inspect_pid(pid)?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| host_path(pid, &p.to_string_lossy()))
        .unwrap_or_default();
    super::refuse_go(&exe)?;
    let (dlopen, dlerror) = preflight(pid, &maps).map_err(refuse)?;
    let dir_in_target = format!("/tmp/{}", sampler::DIR_NAME);
    let path_in_target = format!("{dir_in_target}/{}", sampler::FILE_NAME);
    if !loaded(&maps) {
        // In its root, and where no one else can swap the library before it is loaded.
        let host_dir = PathBuf::from(format!("/proc/{pid}/root{dir_in_target}"));
        let check = || {
            sampler::check_dir(&host_dir)
                .map_err(|r| refuse(format!("{}: {r}", host_dir.display())))
        };
        check()?;
        sampler::install(&host_dir).map_err(|e| refuse(e.to_string()))?;
        check()?;
    }
    let mut child = Command::new("/proc/self/exe")
        .args([
            HELPER_ARG,
            &pid.to_string(),
            &path_in_target,
            &mean.to_string(),
            &dlopen.to_string(),
            &dlerror.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|e| refuse(format!("cannot start the injecting helper: {e}")))?;
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let status = child.wait().map_err(|e| refuse(e.to_string()))?;
    parse_answer(&out, status.success()).map_err(refuse)
}

/// The helper's answer: `ok STOP_US REWRITTEN AGAIN` or `no REASON`.
fn parse_answer(out: &str, success: bool) -> Result<Injected, String> {
    let line = out.lines().last().unwrap_or("");
    if let Some(reason) = line.strip_prefix("no ") {
        return Err(reason.to_string());
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields[..] {
        ["ok", us, n, again] if success => Ok(Injected {
            stopped: Duration::from_micros(us.parse().unwrap_or(0)),
            rewritten: n.parse().unwrap_or(0),
            again: again != "0",
            preloaded: again == "2",
        }),
        _ => Err("the injecting helper ended without an answer".into()),
    }
}

/// A field of `/proc/PID/status` (`name` with its colon), trimmed.
fn status_field(pid: u32, name: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
}

/// What makes injection unsafe or impossible, checked before the process is touched; the
/// addresses of its libc's `dlopen` and `dlerror` when nothing does.
fn preflight(pid: u32, maps: &[Mapping]) -> Result<(u64, u64), String> {
    let field = |name: &str| status_field(pid, name);
    if let Some(t) = field("TracerPid:").filter(|t| t != "0") {
        return Err(format!(
            "it is being traced already, by pid {t} (a debugger?)"
        ));
    }
    if field("Seccomp:").as_deref() == Some("2") {
        return Err(
            "it runs under a seccomp filter, which may kill it for the calls that load a \
             library"
                .into(),
        );
    }
    let scope = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    if scope.trim() == "3" {
        return Err("kernel.yama.ptrace_scope is 3: ptrace is disabled on this system".into());
    }
    let libc = maps
        .iter()
        .find(|m| is_libc_name(&m.path))
        .ok_or("it is statically linked (no libc.so mapped, no dlopen to load a library with)")?;
    let host = host_path(pid, &libc.path);
    let data = fs::read(&host).map_err(|e| format!("cannot read its libc: {e}"))?;
    let elf = object::File::parse(&*data).map_err(|e| format!("its libc: {e}"))?;
    let exported = |name: &str| {
        elf.dynamic_symbols()
            .any(|s| s.name() == Ok(name) && !s.is_undefined())
    };
    if !exported("gnu_get_libc_version") || !exported("dlopen") {
        return Err(format!(
            "its libc ({}) is not a glibc that exports dlopen (2.34 or later)",
            libc.path
        ));
    }
    let at = |name: &str| {
        address_of(maps, &libc.path, &data, name)
            .ok_or_else(|| format!("its libc ({}) has no {name} mapped", libc.path))
    };
    Ok((at("dlopen")?, at("dlerror")?))
}

/// After a maps refresh of an injected process (`before` its maps then, `after` now): when it
/// mapped new code, the objects a dlopen brought, whose GOT entries still reach the
/// allocator, are redirected by another [`inject`] (which finds the library loaded and only
/// calls its attach). The line to say, if it did.
pub fn follow_new_code(
    pid: u32,
    mean: u64,
    before: &[Mapping],
    after: &[Mapping],
) -> Option<String> {
    if !new_code(before, after) {
        return None;
    }
    Some(match inject(pid, mean) {
        Ok(done) => done.describe(pid),
        Err(e) => format!("re-injecting for new objects: {e}"),
    })
}

/// Whether the process mapped code since `before` (`after` its maps now).
fn new_code(before: &[Mapping], after: &[Mapping]) -> bool {
    after
        .iter()
        .filter(|m| m.executable && !m.path.ends_with(sampler::FILE_NAME))
        .any(|m| !before.iter().any(|b| b.executable && b.path == m.path))
}

/// Whether a failed seize or choice is tried again: another tracer's hold, a thread busy in
/// the allocator, the loader or a fork.
fn retried(why: &str) -> bool {
    why.starts_with(remote::TRACED) || why.starts_with("thread ") && why.contains(" is ")
}

/// Whether the library is mapped in the process already.
fn loaded(maps: &[Mapping]) -> bool {
    maps.iter()
        .any(|m| m.path.ends_with(&format!("/{}", sampler::FILE_NAME)))
}

/// The address of `name` defined in the object mapped from `path` in `maps`.
fn address_of(maps: &[Mapping], path: &str, data: &[u8], name: &str) -> Option<u64> {
    let elf = object::File::parse(data).ok()?;
    let sym = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok(name) && !s.is_undefined())?;
    let base = maps
        .iter()
        .filter(|m| m.path == path)
        .map(|m| m.start - m.offset)
        .min()?;
    use object::ObjectSegment as _;
    let first = elf.segments().map(|s| s.address()).min().unwrap_or(0);
    Some(base + sym.address() - first)
}

/// The code of the objects a thread must not be stopped in to call `dlopen`: libc, the
/// dynamic loader, malloc replacements, the sampler.
fn risky(maps: &[Mapping]) -> Vec<(u64, u64)> {
    maps.iter()
        .filter(|m| m.executable)
        .filter(|m| {
            let base = m.path.rsplit('/').next().unwrap_or(&m.path);
            is_libc_name(&m.path)
                || base.starts_with("ld-linux")
                || base.contains("malloc")
                || base == sampler::FILE_NAME
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// `bridge-trace __inject-helper PID PATH MEAN DLOPEN DLERROR` (the addresses of its libc's
/// functions, as [`preflight`] found them): makes the calls and prints its answer line.
/// Runs in a process of its own, so that it finishes what it started when bridge-trace is
/// killed; ignores the terminal's and the service manager's stop signals meanwhile.
pub fn helper_main(args: &[String]) -> i32 {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: ignoring a signal.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let answer = match args {
        [pid, path, mean, dlopen, dlerror] => {
            match (pid.parse(), mean.parse(), dlopen.parse(), dlerror.parse()) {
                (Ok(pid), Ok(mean), Ok(dlopen), Ok(dlerror)) => {
                    helper(pid, path, mean, (dlopen, dlerror))
                }
                _ => Err("bad helper arguments".into()),
            }
        }
        _ => Err("bad helper arguments".into()),
    };
    match answer {
        Ok(i) => {
            println!(
                "ok {} {} {}",
                i.stopped.as_micros(),
                i.rewritten,
                if i.preloaded { 2 } else { u8::from(i.again) }
            );
            0
        }
        Err(why) => {
            println!("no {why}");
            1
        }
    }
}

fn helper(pid: u32, path: &str, mean: u64, libc: (u64, u64)) -> Result<Injected, String> {
    let (dlopen, dlerror) = libc;
    let maps = read_maps(pid).map_err(|e| e.to_string())?;
    let risky = risky(&maps);
    // Tried again for half a second: a thread inside the allocator or the loader moves on,
    // another injection (a few milliseconds) ends; a debugger does not.
    let mut tries = 0;
    let (mut stopped, tid) = loop {
        let chosen = remote::Stopped::seize(pid as i32)
            .and_then(|stopped| stopped.choose(&risky).map(|tid| (stopped, tid)));
        match chosen {
            Ok(found) => break found,
            Err(why) if tries >= 25 || !retried(&why) => return Err(why),
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    // Read with the process stopped: another injection may have loaded it since.
    let again = loaded(&read_maps(pid).map_err(|e| e.to_string())?);
    if !again {
        let mut bytes = path.as_bytes().to_vec();
        bytes.push(0);
        let handle = stopped.call(tid, dlopen, &[remote::STACK, libc::RTLD_NOW as u64], &bytes)?;
        if handle == 0 {
            let msg = stopped.call(tid, dlerror, &[], &[])?;
            let why = remote::read_string(pid as i32, msg).unwrap_or_else(|| "unknown".into());
            return Err(format!("its dlopen of {path} failed: {why}"));
        }
    }
    let maps = read_maps(pid).map_err(|e| e.to_string())?;
    let lib = maps
        .iter()
        .find(|m| m.path.ends_with(&format!("/{}", sampler::FILE_NAME)))
        .ok_or("the library is not mapped after its dlopen")?
        .path
        .clone();
    // The mapped file's own symbol: a library of another version (preloaded, or injected by
    // another bridge-trace) has its own layout.
    let lib_data = fs::read(host_path(pid, &lib)).map_err(|e| format!("{lib}: {e}"))?;
    let attach = address_of(&maps, &lib, &lib_data, "bridge_trace_sampler_attach")
        .ok_or_else(|| format!("{lib} has no bridge_trace_sampler_attach (an older version?)"))?;
    let done = stopped.call(tid, attach, &[mean], &[])? as i64;
    let stopped_for = stopped.release();
    match done {
        n if n >= 0 => Ok(Injected {
            stopped: stopped_for,
            rewritten: n as u64,
            again,
            preloaded: false,
        }),
        -1 => Ok(Injected {
            stopped: stopped_for,
            rewritten: 0,
            again: true,
            preloaded: true,
        }),
        n => Err(format!("the library's attach failed ({n})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        let i = parse_answer("ok 1234 17 0\n", true).unwrap();
        assert_eq!(i.stopped, Duration::from_micros(1234));
        assert_eq!((i.rewritten, i.again), (17, false));
        assert_eq!(
            parse_answer("no it is statically linked\n", false).unwrap_err(),
            "it is statically linked"
        );
        assert!(parse_answer("", false).is_err());
        assert!(parse_answer("ok 1 2 0", false).is_err());
    }

    #[test]
    fn a_static_program_is_refused() {
        // This test binary is dynamic; a map set without libc stands for a static one.
        let err = preflight(std::process::id(), &[]).unwrap_err();
        assert!(err.contains("statically linked"), "{err}");
    }
}
