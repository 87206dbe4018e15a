//! Stacks of code built the way distributions build it (-O2, no frame pointers), walked in the
//! kernel with unwind tables: real fixtures in C, C++ and Rust, and Debian's own python3.11,
//! each compared with the chain the program itself knows, with the frame-pointer walk, and
//! with gdb's backtrace at the same allocation.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use serde_json::Value;

mod common;
use common::*;

/// One leak site as a fixture wrote it: "site bytes count chain", the chain from the
/// program's `main` to the function that called the allocator.
#[derive(Debug)]
struct Site {
    name: String,
    bytes: u64,
    count: u64,
    chain: Vec<String>,
}

fn sites(path: &Path) -> Vec<Site> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Site {
                name: f[0].into(),
                bytes: f[1].parse().unwrap(),
                count: f[2].parse().unwrap(),
                chain: f[3].split(';').map(String::from).collect(),
            }
        })
        .collect()
}

/// Builds the deep-stack fixtures once: -O2 and no frame pointers, like a distribution.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(TMP).join("deep");
        std::fs::create_dir_all(&dir).unwrap();
        let src = repo().join("tests/fixtures");
        let s = |name: &str| src.join(name).to_str().unwrap().to_string();
        let o = |name: &str| dir.join(name).to_str().unwrap().to_string();
        let flags = ["-O2", "-g", "-fomit-frame-pointer"];
        let cc = |compiler: &str, args: &[&str]| {
            let mut all = flags.to_vec();
            all.extend_from_slice(args);
            compile(compiler, &all);
        };
        cc(
            "gcc",
            &["-shared", "-fPIC", "-o", &o("libdeep.so"), &s("libdeep.c")],
        );
        cc(
            "gcc",
            &[
                "-shared",
                "-fPIC",
                "-o",
                &o("libdeep_plugin.so"),
                &s("deep_plugin.c"),
            ],
        );
        let libdir = format!("-L{}", dir.display());
        cc(
            "gcc",
            &[
                "-o",
                &o("deep"),
                &s("deep.c"),
                &libdir,
                "-ldeep",
                "-ldl",
                "-Wl,-rpath,$ORIGIN",
            ],
        );
        cc("g++", &["-o", &o("deep_cpp"), &s("deep_cpp.cpp")]);
        // The toolchain that builds bridge-trace builds the Rust fixture; its standard library
        // has no frame pointers either.
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        compile(
            &rustc,
            &[
                "--edition",
                "2021",
                "-C",
                "opt-level=3",
                "-g",
                "-o",
                &o("deep_rust"),
                &s("deep_rust.rs"),
            ],
        );
        dir
    })
}

/// A function name without its parameter list, as gdb prints it.
fn bare(name: &str) -> String {
    let name = name.trim();
    if name == "??" {
        return "[unknown]".into();
    }
    if !name.ends_with(')') {
        return name.to_string();
    }
    let mut depth = 0;
    for (i, c) in name.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    return name[..i].trim_end().to_string();
                }
            }
            _ => {}
        }
    }
    name.to_string()
}

/// (frames root first, bare names; bytes; count) of every stack of a JSON report.
fn stacks(report: &Value) -> Vec<(Vec<String>, u64, u64)> {
    report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let frames = s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| bare(f["function"].as_str().unwrap_or("[unknown]")))
                .collect();
            (
                frames,
                s["bytes"].as_u64().unwrap(),
                s["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Where `chain` starts in `frames`, when `frames` holds it followed only by allocator frames.
fn chain_at(
    frames: &[String],
    chain: &[String],
    allocator_frame: fn(&str) -> bool,
) -> Option<usize> {
    (0..frames.len()).find(|&i| {
        frames[i..].starts_with(chain)
            && frames[i + chain.len()..].iter().all(|f| allocator_frame(f))
    })
}

fn c_allocator_frame(_: &str) -> bool {
    false
}

fn cpp_allocator_frame(f: &str) -> bool {
    f.starts_with("operator new")
}

fn rust_allocator_frame(f: &str) -> bool {
    [
        "alloc::",
        "<alloc::",
        "core::",
        "<core::",
        "std::",
        "<std::",
        "__rustc::",
        "__rust_",
    ]
    .iter()
    .any(|p| f.starts_with(p))
}

const LIBC_ROOT: [&str; 3] = ["_start", "__libc_start_main", "__libc_start_call_main"];

/// Every site's stacks: complete from `_start` (through `root` when given) down the chain
/// the program knows, and holding exactly the bytes and allocations it leaked there.
fn assert_sites(
    report: &Value,
    sites: &[Site],
    root: Option<&[&str]>,
    allocator_frame: fn(&str) -> bool,
) {
    let all = stacks(report);
    for site in sites {
        let (mut bytes, mut count) = (0, 0);
        for (frames, b, c) in &all {
            let Some(at) = chain_at(frames, &site.chain, allocator_frame) else {
                continue;
            };
            assert_eq!(
                frames[0], "_start",
                "site {}: stack not complete: {frames:?}",
                site.name
            );
            if let Some(root) = root {
                assert_eq!(
                    &frames[..at],
                    root,
                    "site {}: between _start and main: {frames:?}",
                    site.name
                );
            }
            bytes += b;
            count += c;
        }
        let leaf = site.chain.last().unwrap();
        let near: Vec<_> = all.iter().filter(|(f, _, _)| f.contains(leaf)).collect();
        assert_eq!(
            (bytes, count),
            (site.bytes, site.count),
            "site {}: stacks with the chain {:?} hold (bytes, count) {:?}, the program leaked {:?}\n\
             stacks through {leaf}: {near:#?}",
            site.name,
            site.chain,
            (bytes, count),
            (site.bytes, site.count)
        );
    }
}

/// Records `program args..` (its first argument being where it writes its truth) and returns
/// the JSON report and the sites.
fn record_deep(program: &str, args: &[&str], unwind: &str) -> (Value, Vec<Site>) {
    let fx = fixtures();
    let dir = scratch(&format!("{program}-{unwind}"));
    let (truth, out) = (dir.join("truth"), dir.join("r.json"));
    let exe = fx.join(program);
    let mut cmd = vec![
        "--unwind",
        unwind,
        "-o",
        out.to_str().unwrap(),
        "--",
        exe.to_str().unwrap(),
        truth.to_str().unwrap(),
    ];
    cmd.extend_from_slice(args);
    let output = record(&cmd);
    assert_ok(&output);
    (json(&out), sites(&truth))
}

fn plugin() -> String {
    fixtures()
        .join("libdeep_plugin.so")
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn c_without_frame_pointers_full_chains_through_shared_and_dlopened_libraries() {
    let _g = lock();
    let (report, sites) = record_deep("deep", &[&plugin()], "dwarf");
    assert_eq!(sites.len(), 3, "{sites:?}");
    assert!(
        sites.iter().all(|s| s.chain.len() >= 19),
        "deep chains: {sites:?}"
    );
    assert_sites(&report, &sites, Some(&LIBC_ROOT), c_allocator_frame);
    assert_inlined_frame_lines(&report);
    // Held once its libraries were mapped and at the dlopen: no frame ever lacked its table.
    let counters = &report["meta"]["counters"];
    assert_eq!(counters["unwind_no_table"], 0, "{counters}");
    assert!(counters["start_stops"].as_u64().unwrap() >= 2, "{counters}");
    let unwind = &report["meta"]["unwind"];
    assert_eq!(unwind["mode"], "dwarf");
    assert!(
        unwind["objects"].as_u64().unwrap() >= 5,
        "exe, 2 libraries, libc, ld.so: {unwind}"
    );
}

/// The always-inline `e06_inline` is a frame of its own, marked inlined, at its own line (its
/// call to e07), and e06 at the line where it calls it.
fn assert_inlined_frame_lines(report: &Value) {
    let source = std::fs::read_to_string(repo().join("tests/fixtures/deep.c")).unwrap();
    let line_of = |text: &str| {
        source
            .lines()
            .position(|l| l.contains(text))
            .map(|i| i as u64 + 1)
            .unwrap()
    };
    let frames: Vec<&Value> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["frames"].as_array().unwrap())
        .collect();
    let frame = |name: &str| {
        *frames
            .iter()
            .find(|f| f["function"] == name)
            .unwrap_or_else(|| panic!("no frame {name}"))
    };
    let inlined = frame("e06_inline");
    assert_eq!(inlined["inlined"], true, "{inlined}");
    assert!(
        inlined["file"].as_str().unwrap().ends_with("deep.c"),
        "{inlined}"
    );
    assert_eq!(
        inlined["line"].as_u64(),
        Some(line_of("void *p = e07(n);")),
        "{inlined}"
    );
    let outer = frame("e06");
    assert_eq!(
        outer["line"].as_u64(),
        Some(line_of("STEP(e06, e06_inline)")),
        "{outer}"
    );
}

#[test]
fn cpp_without_frame_pointers_through_libstdcxx_operator_new() {
    let _g = lock();
    let (report, sites) = record_deep("deep_cpp", &[], "auto");
    assert_sites(&report, &sites, Some(&LIBC_ROOT), cpp_allocator_frame);
}

#[test]
fn rust_release_binary_on_the_system_allocator() {
    let _g = lock();
    let (report, sites) = record_deep("deep_rust", &[], "auto");
    // Between _start and the program's main: libc's start, then the Rust runtime's.
    assert_sites(&report, &sites, None, rust_allocator_frame);
}

#[test]
fn frame_pointer_walk_loses_what_unwind_tables_find() {
    let _g = lock();
    let (report, sites) = record_deep("deep", &[&plugin()], "fp");
    let all = stacks(&report);
    for site in &sites {
        let complete = all.iter().any(|(f, _, _)| {
            f[0] == "_start" && chain_at(f, &site.chain, c_allocator_frame).is_some()
        });
        assert!(
            !complete,
            "site {}: a frame-pointer walk of code without frame pointers found the whole chain; \
             the fixture no longer tests unwinding",
            site.name
        );
    }
    // The same sites, with tables: complete (the other tests check every frame).
    let (report, sites) = record_deep("deep", &[&plugin()], "auto");
    assert_sites(&report, &sites, Some(&LIBC_ROOT), c_allocator_frame);
}

/// Writes, at `python3.11 SCRIPT TRUTH`, 20 bytearrays it keeps until `os._exit`, and the
/// bytes CPython allocated for them (`__alloc__`, the length plus its terminator).
const PYTHON_SCRIPT: &str = r#"
import os, sys
kept = [bytearray(1000000 + i) for i in range(20)]
with open(sys.argv[1], "w") as f:
    f.write("%d %d\n" % (sum(b.__alloc__() for b in kept), len(kept)))
os._exit(0)
"#;

const PYTHON: &str = "/usr/bin/python3.11";

/// Launches python3.11 with [`PYTHON_SCRIPT`] under `record`: the JSON report and the truth.
fn record_python(name: &str) -> (Value, PathBuf) {
    let dir = scratch(name);
    let (truth, out) = (dir.join("truth"), dir.join("r.json"));
    let output = record(&[
        "-o",
        out.to_str().unwrap(),
        "--",
        PYTHON,
        "-c",
        PYTHON_SCRIPT,
        truth.to_str().unwrap(),
    ]);
    assert_ok(&output);
    (json(&out), truth)
}

#[test]
fn debian_python3_stack_reaches_main_through_the_interpreter() {
    let _g = lock();
    let (report, truth) = record_python("python3");
    assert_python_stacks(&report, &truth);
}

/// The bytearrays' stacks (through `PyByteArray_Resize`) hold exactly what the script says it
/// kept, and reach from `_start` through the interpreter's entry and evaluation loop.
fn assert_python_stacks(report: &Value, truth: &Path) {
    let t = std::fs::read_to_string(truth).unwrap();
    let f: Vec<u64> = t.split_whitespace().map(|v| v.parse().unwrap()).collect();
    let (want_bytes, want_count) = (f[0], f[1]);
    let through: Vec<_> = stacks(report)
        .into_iter()
        .filter(|(f, _, _)| f.iter().any(|n| n == "PyByteArray_Resize"))
        .collect();
    let bytes: u64 = through.iter().map(|s| s.1).sum();
    let count: u64 = through.iter().map(|s| s.2).sum();
    assert_eq!((bytes, count), (want_bytes, want_count), "{through:#?}");
    // Debian's python3.11 main() tail-calls Py_BytesMain: from _start through libc's start,
    // the interpreter's entry, its evaluation loop, down to the bytearray's allocation.
    let expected = [
        "_start",
        "__libc_start_call_main",
        "Py_BytesMain",
        "Py_RunMain",
        "_PyEval_EvalFrameDefault",
        "PyByteArray_Resize",
    ];
    for (frames, _, _) in &through {
        assert_eq!(frames[0], "_start", "{frames:?}");
        let mut at = 0;
        for want in expected {
            at += frames[at..]
                .iter()
                .position(|f| f == want)
                .unwrap_or_else(|| panic!("{want} missing (in order) from {frames:?}"));
        }
    }
}

/// The same bytearrays in a python3.11 that was already running: tables loaded in the
/// background while the probes are live.
#[test]
fn running_python3_by_pid() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let _g = lock();
    let dir = scratch("python3-pid");
    let (truth, out) = (dir.join("truth"), dir.join("r.json"));
    let script = r#"
import sys
print("ready", flush=True)
sys.stdin.readline()
kept = [bytearray(1000000 + i) for i in range(20)]
with open(sys.argv[1], "w") as f:
    f.write("%d %d\n" % (sum(b.__alloc__() for b in kept), len(kept)))
print("leaked", flush=True)
sys.stdin.readline()
"#;
    let mut python = Command::new(PYTHON)
        .args(["-c", script, truth.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = python.stdin.take().unwrap();
    let mut stdout = BufReader::new(python.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    if line.trim() != "ready" {
        drop(stdin);
        let out = python.wait_with_output().unwrap();
        panic!(
            "python3 did not start ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pid = python.id().to_string();
    let (tracer, _stderr) = start_tracer(&["--pid", &pid, "-o", out.to_str().unwrap()]);
    // The tables are built off the tracing path; give them time before the allocations (the
    // report counts any frame walked without them, and the assertions below would fail).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    writeln!(stdin, "go").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "leaked");
    signal(&tracer, libc::SIGINT);
    let output = tracer.wait_with_output().unwrap();
    assert_ok(&output);
    drop(stdin);
    assert!(python.wait().unwrap().success(), "python3 was harmed");
    assert_python_stacks(&json(&out), &truth);
}

/// gdb's backtrace at the first allocator call matching `condition` (e.g. `malloc if $rdi ==
/// 40000`): the callers' names, root first, without the allocator's own frame.
fn gdb_backtrace(breaks: &[&str], argv: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("gdb");
    cmd.args([
        "-nx",
        "-batch",
        "-ex",
        "set pagination off",
        "-ex",
        "set breakpoint pending on",
    ])
    .args(["-ex", "set debuginfod enabled off", "-ex", "set width 0"]);
    for b in breaks {
        cmd.args(["-ex", &format!("break {b}")]);
    }
    cmd.args(["-ex", "run", "-ex", "bt", "-ex", "kill", "--args"])
        .args(argv);
    let out = cmd.output().expect("gdb (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    // gdb names glibc's functions by whichever alias its DWARF has (`__libc_start_main_impl`);
    // bridge-trace by their public names, as valgrind does: compare like with like.
    let public =
        bridge_trace::symbolize::public_names_of(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"));
    let frames: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            // "#3  0x0000... in name (args) at file:line", "#4  name (args) at ...",
            // "#5  0x... in name () from /lib/..."
            let rest = l.split_once(char::is_whitespace).unwrap().1.trim_start();
            let rest = match rest.split_once(" in ") {
                Some((addr, name)) if addr.starts_with("0x") => name,
                _ => rest,
            };
            let name = match rest.find(" (") {
                Some(i) => &rest[..i],
                None => rest,
            };
            let name = bare(name);
            public.get(&name).cloned().unwrap_or(name)
        })
        .collect();
    assert!(
        frames.len() > 1,
        "gdb found no backtrace:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    frames[1..].iter().rev().cloned().collect()
}

/// bridge-trace's stack ending in `leaf`, from the same root as gdb's (gdb stops at main).
fn our_chain(report: &Value, leaf_chain: &[String], gdb: &[String]) -> Vec<String> {
    let all = stacks(report);
    let frames = all
        .iter()
        .map(|(f, _, _)| f)
        .find(|f| f.ends_with(leaf_chain))
        .unwrap_or_else(|| panic!("no stack ends in {leaf_chain:?}: {all:#?}"));
    let root = &gdb[0];
    let at = frames
        .iter()
        .position(|f| f == root)
        .unwrap_or_else(|| panic!("gdb's root {root} not in our stack {frames:?}"));
    frames[at..].to_vec()
}

#[test]
fn gdb_backtrace_at_the_same_call_site_agrees() {
    let _g = lock();
    let fx = fixtures();
    let deep = fx.join("deep").to_str().unwrap().to_string();
    let (report, sites) = record_deep("deep", &[&plugin()], "auto");
    let truth = scratch("gdb-deep").join("truth");
    let argv = [deep.as_str(), truth.to_str().unwrap(), &plugin()];
    for (site, brk) in [
        ("lib_chain", "malloc if $rdi == 40000"),
        ("plugin_chain", "calloc if $rsi == 30000"),
        ("recursion", "realloc if $rsi == 20000"),
    ] {
        let gdb = gdb_backtrace(&[brk], &argv);
        let site = sites.iter().find(|s| s.name == site).unwrap();
        let ours = our_chain(&report, &site.chain[site.chain.len() - 3..], &gdb);
        assert_eq!(
            ours, gdb,
            "site {}: bridge-trace (left) against gdb (right)",
            site.name
        );
    }

    let cpp = fx.join("deep_cpp").to_str().unwrap().to_string();
    let (report, sites) = record_deep("deep_cpp", &[], "auto");
    let truth = scratch("gdb-cpp").join("truth");
    let gdb = gdb_backtrace(
        &["malloc if $rdi == 50000"],
        &[&cpp, truth.to_str().unwrap()],
    );
    // gdb stops in malloc, called by operator new; bridge-trace names operator new's caller as
    // the site and leaves operator new out.
    let leaf = sites[0].chain[sites[0].chain.len() - 2..].to_vec();
    let ours = our_chain(&report, &leaf, &gdb);
    assert_eq!(
        gdb.last().map(String::as_str),
        Some("operator new"),
        "{gdb:?}"
    );
    assert_eq!(
        ours,
        gdb[..gdb.len() - 1],
        "C++: bridge-trace (left) against gdb (right)"
    );

    // Debian's python3.11: gdb has no more symbols than bridge-trace (none for its static
    // functions), so unnamed frames must line up too.
    let (report, truth) = record_python("gdb-python");
    let gdb = gdb_backtrace(
        &["malloc if $rdi == 1000001", "realloc if $rsi == 1000001"],
        &[PYTHON, "-c", PYTHON_SCRIPT, truth.to_str().unwrap()],
    );
    let at = gdb
        .iter()
        .position(|f| f == "PyByteArray_Resize")
        .unwrap_or_else(|| panic!("gdb stopped elsewhere: {gdb:?}"));
    let ours = our_chain(&report, &gdb[at..], &gdb);
    assert_eq!(
        ours, gdb,
        "python3.11: bridge-trace (left) against gdb (right)"
    );
}

/// rustc maps libLLVM and librustc_driver (hundreds of MB): every table loads (loading a file
/// twice once filled the row array), and the summary says what it cost.
#[test]
fn large_libraries_load_once_and_fit() {
    let _g = lock();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .unwrap();
    let real = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join("bin/rustc");
    let dir = scratch("rustc");
    let out = dir.join("r.json");
    let output = record(&[
        "-o",
        out.to_str().unwrap(),
        "--",
        real.to_str().unwrap(),
        "--version",
    ]);
    assert_ok(&output);
    let report = json(&out);
    let unwind = &report["meta"]["unwind"];
    assert_eq!(unwind["missing"], serde_json::json!([]), "{unwind}");
    assert!(unwind["rows"].as_u64().unwrap() > 1_000_000, "{unwind}");
    let slowest = unwind["slowest"][0].as_str().unwrap();
    assert!(
        slowest.contains("libLLVM") || slowest.contains("rustc_driver"),
        "{unwind}"
    );
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("stacks: unwind tables"), "{summary}");
}
