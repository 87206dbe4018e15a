//! `--inject`: the sampler loaded into a process that is already running (ptrace, dlopen, the
//! GOT rewritten), on real processes. Each target (tests/fixtures/inject_target.c) waits in a
//! system call while it is injected, then leaks what it knows and checks that nothing it can
//! see changed: its blocks from before, its calls restarted, its signals delivered, its exit
//! status. `record --inject` reports every allocation (interval 1), so the leak must be exact.
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// The fixture, built once per test binary.
fn fixture() -> &'static Path {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let out = Path::new(TMP).join("inject_target");
        build_c(&out, "tests/fixtures/inject_target.c", &["-O2", "-pthread"]);
        out
    })
}

/// The fixture built into `dir` with one more flag (a library, `-static`).
fn fixture_with(dir: &Path, flag: &str) -> PathBuf {
    let exe = dir.join("inject_target");
    build_c(
        &exe,
        "tests/fixtures/inject_target.c",
        &["-O2", "-pthread", flag],
    );
    exe
}

/// A running fixture.
struct Target {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    truth: PathBuf,
}

impl Target {
    fn start(mode: &str, threads: usize, dir: &Path) -> Target {
        Self::start_with(&mut Command::new(fixture()), mode, threads, dir, &[])
    }

    fn start_with(
        cmd: &mut Command,
        mode: &str,
        threads: usize,
        dir: &Path,
        extra: &[&str],
    ) -> Target {
        let truth = dir.join("truth");
        let mut child = cmd
            .args([mode, &threads.to_string(), truth.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        Target {
            child: KillOnDrop(child),
            stdin,
            stdout,
            truth,
        }
    }

    /// Started with a plugin built from tests/fixtures/leaky_plugin.c (modes dlopen, plugin).
    fn with_plugin(mode: &str, threads: usize, dir: &Path) -> Target {
        let plugin = dir.join("plugin.so");
        build_c(
            &plugin,
            "tests/fixtures/leaky_plugin.c",
            &["-shared", "-fPIC"],
        );
        let plugin = plugin.to_str().unwrap();
        Self::start_with(&mut Command::new(fixture()), mode, threads, dir, &[plugin])
    }

    /// The report holds exactly what it says it leaked at `site`.
    fn leaked_exactly(&self, report: &serde_json::Value, site: &str) {
        let got = by_leaf(report);
        assert_eq!(got.get(site), truth(&self.truth).get(site), "{got:?}");
    }

    /// Closes its stdin and checks that it saw nothing wrong and exited 0.
    fn unharmed(self) {
        let (last, ok) = self.finish();
        assert!(ok && last.starts_with("ok"), "{last}");
    }

    fn pid(&self) -> String {
        self.child.0.id().to_string()
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// Tells it to go and waits until it has done its work.
    fn go(&mut self) {
        writeln!(self.stdin.as_mut().unwrap()).unwrap();
        assert_eq!(self.line(), "done");
    }

    /// Closes its stdin: its last line and exit status.
    fn finish(mut self) -> (String, bool) {
        drop(self.stdin.take());
        let last = self.line();
        let ok = self.child.0.wait().unwrap().success();
        (last, ok)
    }

    /// `bridge-trace record --pid PID --inject`, with `extra` arguments, its report at `out`.
    fn record_inject(&self, extra: &[&str], out: &Path) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["record", "--pid", &self.pid(), "--inject"])
            .args(extra)
            .arg("-o")
            .arg(out);
        cmd
    }

    /// The sampler's mappings in it (executable ones: one per load).
    fn loaded(&self) -> usize {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .unwrap()
            .lines()
            .filter(|l| l.contains("libbridge_trace_sampler.so") && l.contains(" r-xp "))
            .count()
    }
}

/// Starts `record --pid --inject` (quiet: its first line is the start line, said once the
/// probes are on the injected library).
fn start_record(target: &Target, report: &Path) -> (Child, BufReader<std::process::ChildStderr>) {
    let (tracer, stderr) = start_tracer(&[
        "--pid",
        &target.pid(),
        "--inject",
        "-o",
        report.to_str().unwrap(),
    ]);
    (tracer, stderr)
}

/// Ends a record with SIGINT and returns its report.
fn end_record(mut tracer: Child, report: &Path) -> serde_json::Value {
    signal(&tracer, libc::SIGINT);
    assert!(tracer.wait().unwrap().success(), "record failed");
    json(report)
}

/// Injected while its main thread waits in `mode`, with `threads` workers waiting on a
/// condition variable: the leak is reported exactly (every allocation is a sample), at tier
/// usdt, and the program sees nothing: its old blocks intact and reallocated, its call
/// restarted, exit status 0.
fn exact_and_unharmed(mode: &str, threads: usize) {
    let _g = lock();
    let dir = scratch(&format!("inject-{mode}-{threads}"));
    exact_and_unharmed_in(Target::start(mode, threads, &dir), mode, &dir);
}

fn exact_and_unharmed_in(mut target: Target, mode: &str, dir: &Path) {
    let ready = Instant::now();
    let report = dir.join("report.json");
    let (tracer, _stderr) = start_record(&target, &report);
    assert_eq!(target.loaded(), 1);
    if mode == "sleep" {
        // Injected during its sleep (1.5 s from its "ready"): slept the whole of it,
        // uninterrupted (rc 0).
        assert!(
            ready.elapsed() < Duration::from_millis(1500),
            "injected after the sleep"
        );
        let slept = target.line();
        let f: Vec<&str> = slept.split_whitespace().collect();
        let ms: f64 = f[1].parse().unwrap();
        assert_eq!(f[2], "0", "{slept}");
        assert!((3000.0..4500.0).contains(&ms), "{slept}");
    }
    target.go();
    let r = end_record(tracer, &report);
    assert_eq!(r["meta"]["tier"], "usdt");
    target.leaked_exactly(&r, "leak_site");
    target.unharmed();
}

/// Under jemalloc (linked: the process's malloc is jemalloc's, which the library forwards to,
/// not glibc's behind it).
#[test]
fn injected_under_jemalloc() {
    let _g = lock();
    let dir = scratch("inject-jemalloc");
    let exe = fixture_with(&dir, "-ljemalloc");
    let target = Target::start_with(&mut Command::new(&exe), "read", 2, &dir, &[]);
    exact_and_unharmed_in(target, "read", &dir);
}

#[test]
fn injected_in_read_single_threaded() {
    exact_and_unharmed("read", 0);
}

#[test]
fn injected_in_read_multi_threaded() {
    exact_and_unharmed("read", 4);
}

#[test]
fn injected_in_nanosleep() {
    exact_and_unharmed("sleep", 2);
}

#[test]
fn injected_in_futex() {
    exact_and_unharmed("futex", 3);
}

#[test]
fn injected_while_it_dlopens() {
    let _g = lock();
    let dir = scratch("inject-dlopen");
    let mut target = Target::with_plugin("dlopen", 2, &dir);
    let report = dir.join("report.json");
    let (tracer, _stderr) = start_record(&target, &report);
    target.go();
    let r = end_record(tracer, &report);
    target.leaked_exactly(&r, "leak_site");
    target.unharmed();
}

/// A library the target dlopens after the injection: bridge-trace sees the new object,
/// injects again (the library found loaded: only its attach is called) and the plugin's own
/// calls to malloc, through its own GOT, are sampled too: its leak exact.
#[test]
fn objects_loaded_after_the_injection_are_redirected() {
    let _g = lock();
    let dir = scratch("inject-plugin");
    let mut target = Target::with_plugin("plugin", 1, &dir);
    let report = dir.join("report.json");
    let (tracer, mut stderr) = start_record(&target, &report);
    writeln!(target.stdin.as_mut().unwrap()).unwrap();
    assert_eq!(target.line(), "loaded");
    let mut said = String::new();
    while !said.contains("(loaded before)") {
        said.clear();
        assert!(stderr.read_line(&mut said).unwrap() > 0, "record ended");
    }
    target.go();
    let r = end_record(tracer, &report);
    target.leaked_exactly(&r, "plugin_leak");
    target.leaked_exactly(&r, "leak_site");
    target.unharmed();
}

/// A signal sent to the target while the helper holds it is delivered to its handler once it
/// is let go (SA_RESTART: its read goes on), none lost, none delivered mid-call: one signal
/// per injection, sent while the process is held (its TracerPid set before and after the
/// kill), each handled, a second apart so that none merge.
#[test]
fn signals_during_the_stop_are_delivered() {
    let _g = lock();
    let dir = scratch("inject-signals");
    let mut target = Target::start("read", 2, &dir);
    let pid = target.pid();
    let (mut sent, mut inside) = (0, 0);
    for i in 0..8 {
        let mut tracer = target
            .record_inject(
                &["--quiet", "--duration", "1s"],
                &dir.join(format!("r{i}.json")),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        until_held(&pid, &mut tracer);
        let before = tracer_of(&pid) != 0;
        // SAFETY: a signal to the fixture, which handles it.
        unsafe { libc::kill(pid.parse().unwrap(), libc::SIGUSR1) };
        sent += 1;
        inside += usize::from(before && tracer_of(&pid) != 0);
        assert!(tracer.wait().unwrap().success());
    }
    eprintln!("{sent} signals sent, {inside} while the helper held the process");
    assert!(
        inside >= 2,
        "only {inside} signals landed during an injection"
    );
    target.go();
    let (last, ok) = target.finish();
    assert!(ok, "{last}");
    let handled: i32 = last.strip_prefix("ok ").unwrap().parse().unwrap();
    assert_eq!(handled, sent, "sent {sent}, handled {handled}");
}

/// Spins until the injecting helper holds `pid` (its TracerPid set), or `tracer` is past that
/// or gone.
fn until_held(pid: &str, tracer: &mut Child) {
    let start = Instant::now();
    while tracer_of(pid) == 0
        && tracer.try_wait().unwrap().is_none()
        && start.elapsed() < Duration::from_secs(20)
    {
        std::hint::spin_loop();
    }
}

/// The target's TracerPid: nonzero while the injecting helper holds it.
fn tracer_of(pid: &str) -> u32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// bridge-trace SIGKILLed at every moment of an injection (from the helper's seize on, in
/// steps through the ~2 ms it holds the process): the target is never left stopped or
/// traced, keeps working and exits 0; the library is loaded at most once; and an injection
/// after all that still works.
#[test]
fn sigkill_of_the_tracer_at_any_stage() {
    let _g = lock();
    let dir = scratch("inject-sigkill");
    let mut target = Target::start("read", 2, &dir);
    let pid = target.pid();
    let mut mid = 0;
    for delay_us in [0u64, 50, 100, 200, 300, 500, 700, 1000, 1400, 2000, 3000] {
        let mut tracer = target
            .record_inject(&["--quiet"], &dir.join("killed.json"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Until the helper has seized the process (or the tracer is past it, or gone).
        until_held(&pid, &mut tracer);
        std::thread::sleep(Duration::from_micros(delay_us));
        let held = tracer_of(&pid) != 0;
        tracer.kill().unwrap();
        tracer.wait().unwrap();
        mid += usize::from(held);
        // The helper finishes what it started, then lets the process go.
        let start = Instant::now();
        while tracer_of(&pid) != 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "still traced");
            std::thread::sleep(Duration::from_millis(1));
        }
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = state
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        assert!(state == "S" || state == "R", "left in state {state}");
        assert!(target.loaded() <= 1);
    }
    eprintln!("SIGKILLed while the helper held the process: {mid} of 11");
    assert!(mid >= 2, "only {mid} kills landed during an injection");
    let report = dir.join("report.json");
    let (tracer, _stderr) = start_record(&target, &report);
    assert_eq!(target.loaded(), 1);
    target.go();
    let r = end_record(tracer, &report);
    target.leaked_exactly(&r, "leak_site");
    target.unharmed();
}

/// Injected twice (a second record, then two at once): loaded once; each one that runs says so
/// and traces, one that finds the other injecting at that moment is refused (exit 5).
#[test]
fn injecting_twice_loads_it_once() {
    let _g = lock();
    let dir = scratch("inject-twice");
    let mut target = Target::start("read", 1, &dir);
    let out = target
        .record_inject(&["--duration", "1s"], &dir.join("first.json"))
        .output()
        .unwrap();
    assert_ok(&out);
    let first = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(first.contains("injected the sampler into pid"), "{first}");
    assert!(!first.contains("loaded before"), "{first}");
    let both: Vec<_> = (0..2)
        .map(|i| {
            let again = dir.join(format!("again{i}.json"));
            target
                .record_inject(&["--duration", "1s"], &again)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ran = 0;
    for child in both {
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {
                assert!(said.contains("(loaded before)"), "{said}");
                ran += 1;
            }
            Some(5) => assert!(said.contains("traced already"), "{said}"),
            other => panic!("{other:?}: {said}"),
        }
    }
    assert!(ran >= 1);
    assert_eq!(target.loaded(), 1);
    target.go();
    target.unharmed();
}

/// A target in a mount namespace of its own, with a /tmp of its own: the library is written
/// into its /tmp (through /proc/PID/root), not ours, and the leak is exact.
#[test]
fn a_target_with_its_own_mount_namespace() {
    let _g = lock();
    // Its /tmp hides ours, where the fixture and the scratch directory may be (a clone in
    // /tmp): it runs from a descriptor opened before, and writes its truth to /dev/shm.
    let dir = Path::new("/dev/shm/bridge-trace-inject-mntns");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let script = "exec 3<\"$1\"; shift; mount -t tmpfs none /tmp && exec /proc/self/fd/3 \"$@\"";
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(fixture());
    let mut target = Target::start_with(&mut cmd, "read", 1, dir, &[]);
    let report = dir.join("report.json");
    let (tracer, _stderr) = start_record(&target, &report);
    let root_tmp = format!("/proc/{}/root/tmp", target.pid());
    let theirs = std::fs::metadata(&root_tmp).unwrap();
    let ours = std::fs::metadata("/tmp").unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_ne!(theirs.dev(), ours.dev(), "its /tmp is its own");
    let lib = std::fs::read_dir(&root_tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.path().join("libbridge_trace_sampler.so").is_file());
    assert!(lib, "the library is in its own /tmp");
    target.go();
    let r = end_record(tracer, &report);
    target.leaked_exactly(&r, "leak_site");
    target.unharmed();
}

/// Runs `record --pid --inject` expecting a refusal: exit `code`, one line saying `why`, the
/// process untouched (no library mapped, still working).
fn refused(target: Target, code: i32, why: &str) {
    refused_while(target, code, why, |_| {});
}

/// As [`refused`], with `hold` done to the target first and `release` after the attempt.
fn refused_while(mut target: Target, code: i32, why: &str, hold: impl Fn(bool)) {
    hold(true);
    let out = target
        .record_inject(
            &["--duration", "1s"],
            &target.truth.with_file_name("refused.json"),
        )
        .output()
        .unwrap();
    hold(false);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{said}");
    assert!(said.contains(why), "{said}");
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert_eq!(target.loaded(), 0);
    target.go();
    target.unharmed();
}

/// Its only thread blocked in vfork (the child sleeping): refused, untouched, once the child
/// is gone it goes on.
#[test]
fn a_process_in_vfork_is_refused() {
    let _g = lock();
    let dir = scratch("inject-vfork");
    refused(Target::start("vfork", 0, &dir), 5, "did not stop");
}

/// A process started with the sampler preloaded: the injection finds it there, changes
/// nothing, and the record goes on through its probes, not as if every allocation were reported.
#[test]
fn a_preloaded_process_needs_no_injection() {
    let _g = lock();
    let dir = scratch("inject-preloaded");
    let mut cmd = Command::new(fixture());
    cmd.env("LD_PRELOAD", sampler_lib());
    let mut target = Target::start_with(&mut cmd, "read", 1, &dir, &[]);
    let report = dir.join("report.json");
    let out = target
        .record_inject(&["--duration", "1s"], &report)
        .output()
        .unwrap();
    assert_ok(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("(preloaded: nothing to change)"), "{said}");
    let r = json(&report);
    assert_eq!(r["meta"]["tier"], "usdt");
    assert!(r["meta"].get("injected").is_none(), "{}", r["meta"]);
    assert_eq!(target.loaded(), 1);
    target.go();
    target.unharmed();
}

#[test]
fn a_process_under_seccomp_is_refused() {
    let _g = lock();
    let dir = scratch("inject-seccomp");
    refused(Target::start("seccomp", 0, &dir), 5, "seccomp filter");
}

/// This test's own thread holds the target with ptrace, as a debugger would.
#[test]
fn a_process_being_traced_is_refused() {
    let _g = lock();
    let dir = scratch("inject-traced");
    let target = Target::start("read", 0, &dir);
    let pid: i32 = target.pid().parse().unwrap();
    refused_while(target, 5, "traced already", |hold| {
        // SAFETY: seizing our own child (no stop: it keeps running); letting it go, which a
        // tracer does from a stop: interrupted, waited for, detached.
        let r = unsafe {
            if hold {
                libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0)
            } else {
                libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0);
                let mut status = 0;
                libc::waitpid(pid, &mut status, libc::__WALL);
                libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0)
            }
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    });
}

/// A static executable has no dynamic loader to load a library with.
#[test]
fn a_static_program_is_refused() {
    let _g = lock();
    let dir = scratch("inject-static");
    let exe = fixture_with(&dir, "-static");
    refused(
        Target::start_with(&mut Command::new(&exe), "read", 0, &dir, &[]),
        5,
        "statically linked",
    );
}
