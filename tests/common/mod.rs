//! Helpers shared by the integration test binaries: the global lock, fixture builds, running
//! the real `bridge-trace` binary and reading what it wrote.
#![allow(dead_code)]
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_bridge-trace");

/// Bytes and count per call site.
pub type Sites = BTreeMap<String, (u64, u64)>;

/// "site bytes count" lines written by a fixture: what it knows it leaked.
pub fn truth(path: &Path) -> Sites {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                (f[1].parse().unwrap(), f[2].parse().unwrap()),
            )
        })
        .collect()
}

/// A report's bytes and counts per site, where `site` names a stack's site from its frames'
/// function names (root first; `[unknown]` for an unnamed frame), or leaves it out (`None`).
pub fn sites_by(report: &Value, site: impl Fn(&[&str]) -> Option<String>) -> Sites {
    let mut out = Sites::new();
    for s in report["stacks"].as_array().unwrap() {
        let frames = functions(s);
        let Some(name) = site(&frames) else { continue };
        let e = out.entry(name).or_default();
        e.0 += s["bytes"].as_u64().unwrap();
        e.1 += s["count"].as_u64().unwrap();
    }
    out
}

/// A function's name without its parameters (C++'s `leak_new()` → `leak_new`).
pub fn bare(name: &str) -> &str {
    name.split('(').next().unwrap_or(name)
}

/// The leaf frame (the allocation's direct caller), bare.
pub fn leaf(frames: &[&str]) -> Option<String> {
    frames.last().map(|f| bare(f).to_string())
}

/// Bytes and counts per leaf function.
pub fn by_leaf(report: &Value) -> Sites {
    sites_by(report, leaf)
}

/// What each leaf function allocated while traced, freed or not (the report's allocation
/// profile).
pub fn allocated_by_leaf(report: &Value) -> Sites {
    let allocated = report
        .get("allocated")
        .unwrap_or_else(|| panic!("no allocation profile in the report"));
    sites_by(&serde_json::json!({ "stacks": allocated }), leaf)
}
pub const TMP: &str = env!("CARGO_TARGET_TMPDIR");

pub fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn gcc(args: &[&str]) {
    compile("gcc", args);
}

/// Runs a compiler (gcc, g++, rustc) and fails the test with its errors.
pub fn compile(compiler: &str, args: &[&str]) {
    let out = Command::new(compiler)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{compiler} (cargo xtask setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{compiler} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(TMP).join("runs").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn record(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("record")
        .arg("--quiet")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "bridge-trace failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Starts `bridge-trace record` and waits for its "tracing" line (probes attached).
pub fn start_tracer(args: &[&str]) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut tracer = Command::new(BIN)
        .arg("record")
        .arg("--quiet")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(tracer.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("tracing"), "unexpected first line: {line}");
    (tracer, stderr)
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// `go tool pprof -top -unit=B` with `extra` flags on a profile: its table (panics, with the
/// output, unless pprof succeeds).
pub fn pprof_top(profile: &Path, extra: &[&str]) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof", "-top", "-unit=B"])
        .args(extra)
        .arg(profile)
        .output()
        .expect("go (cargo xtask setup installs golang-go)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// GET `path` on 127.0.0.1:`port`: the status and the body (as text, lossily); status 0
/// while nothing listens there.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(request.as_bytes());
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Kills the child when a failed assertion unwinds past it.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with its stdout piped and waits for its first line, "ready"; killed if a
/// failed assertion unwinds.
pub fn spawn_ready(cmd: &mut Command) -> KillOnDrop {
    let (child, _, line) = spawn_reading(cmd);
    assert_eq!(line.trim(), "ready");
    child
}

/// Starts `cmd` with its stdout piped: the child (killed if a failed assertion unwinds), its
/// stdout for what it says later, and its first line, once said.
pub fn spawn_reading(
    cmd: &mut Command,
) -> (KillOnDrop, BufReader<std::process::ChildStdout>, String) {
    let mut child = KillOnDrop(cmd.stdout(Stdio::piped()).spawn().unwrap());
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    (child, out, line)
}

/// The in-process sampler, written out by `bridge-trace sampler install` (once per test binary).
pub fn sampler_lib() -> &'static Path {
    static LIB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIB.get_or_init(|| {
        let dir = Path::new(TMP).join("sampler");
        let out = Command::new(BIN)
            .args(["sampler", "install"])
            .arg(&dir)
            .output()
            .unwrap();
        assert_ok(&out);
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(path.starts_with(&dir) && path.is_file(), "{path:?}");
        path
    })
}

/// Builds `source` (a path in the repository) into `out` with gcc: debug information, frame
/// pointers, tests/fixtures on the include path, and `flags` (optimisation, -shared, libraries).
pub fn build_c(out: &Path, source: &str, flags: &[&str]) {
    let include = repo().join("tests/fixtures");
    let source = repo().join(source);
    let mut args = vec![
        "-g",
        "-fno-omit-frame-pointer",
        "-I",
        include.to_str().unwrap(),
    ];
    args.extend(["-o", out.to_str().unwrap(), source.to_str().unwrap()]);
    // After the source: a library is linked only where it is named after what uses it.
    args.extend_from_slice(flags);
    gcc(&args);
}

/// Builds tests/fixtures/wrappers.cpp into `out` as a release build of a C++ service is built:
/// -O2 without frame pointers, with debug information (and a GNU build-id).
pub fn build_wrappers(out: &Path) {
    let src = repo().join("tests/fixtures");
    compile(
        "g++",
        &[
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-Wl,--build-id",
            "-I",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            src.join("wrappers.cpp").to_str().unwrap(),
        ],
    );
}

/// The function names of a report stack's frames, root first (`[unknown]` for an unnamed one).
pub fn functions(stack: &Value) -> Vec<&str> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("[unknown]"))
        .collect()
}
