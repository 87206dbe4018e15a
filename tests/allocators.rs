//! Every allocator a service might use, found by bridge-trace itself: the same fixture
//! (`tests/fixtures/allocators.c`) built against glibc, jemalloc, mimalloc and tcmalloc (Debian's
//! packages), through the C functions and through each allocator's own API; C++ new and delete
//! in all their forms (`newdelete.cpp`) on libstdc++ alone and on allocators that implement
//! them; a message pool traced with `--alloc-fn`; and a Go program, refused in one line. Every
//! site's bytes and count against what the fixture says it leaked, and the allocator `record`
//! names.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

use serde_json::Value;

mod common;
use common::*;

/// Each build: (name, compiler, source, extra flags).
const BUILDS: &[(&str, &str, &str, &[&str])] = &[
    ("c-glibc", "gcc", "allocators.c", &[]),
    (
        "c-jemalloc",
        "gcc",
        "allocators.c",
        &["-DUSE_JEMALLOC", "-ljemalloc"],
    ),
    (
        "c-mimalloc",
        "gcc",
        "allocators.c",
        &["-DUSE_MIMALLOC", "-lmimalloc"],
    ),
    (
        "c-tcmalloc",
        "gcc",
        "allocators.c",
        &["-DUSE_TCMALLOC", "-ltcmalloc"],
    ),
    ("cpp-libstdcxx", "g++", "newdelete.cpp", &[]),
    ("cpp-jemalloc", "g++", "newdelete.cpp", &["-ljemalloc"]),
    ("cpp-mimalloc", "g++", "newdelete.cpp", &["-lmimalloc"]),
    ("cpp-tcmalloc", "g++", "newdelete.cpp", &["-ltcmalloc"]),
];

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(TMP).join("allocators");
        std::fs::create_dir_all(&dir).unwrap();
        let src = repo().join("tests/fixtures");
        for (name, compiler, source, extra) in BUILDS {
            let out = dir.join(name);
            let source = src.join(source);
            let mut args = vec![
                "-O1",
                "-g",
                "-fno-omit-frame-pointer",
                "-fno-optimize-sibling-calls",
                "-o",
                out.to_str().unwrap(),
                source.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            compile(compiler, &args);
        }
        dir
    })
}

/// Records `fixture args.. TRUTH` with `extra` record arguments: the run's output, the JSON
/// report's bytes and counts per leaf function, and the fixture's truth.
fn record_fixture(fixture: &str, args: &[&str], extra: &[&str]) -> (Output, Value, Sites, Sites) {
    let dir = scratch(&format!("alloc-{fixture}-{}", args.join("-")));
    let (truth_path, out_json) = (dir.join("truth"), dir.join("r.json"));
    let program = fixtures().join(fixture);
    let mut all: Vec<&str> = extra.to_vec();
    all.extend([
        "-o",
        out_json.to_str().unwrap(),
        "--",
        program.to_str().unwrap(),
    ]);
    all.extend_from_slice(args);
    all.push(truth_path.to_str().unwrap());
    let out = record(&all);
    assert_ok(&out);
    let report = json(&out_json);
    let sites = by_leaf(&report);
    let truth = truth(&truth_path);
    (out, report, sites, truth)
}

/// Every site of the truth holds exactly its bytes and count; no fixture function holds
/// anything it freed; `record` named `allocator` first.
fn assert_exact(fixture: &str, args: &[&str], allocator: &str) -> Value {
    let (out, report, got, truth) = record_fixture(fixture, args, &[]);
    for (site, want) in &truth {
        assert_eq!(
            got.get(site),
            Some(want),
            "{fixture} {args:?}: site {site}: the report has {:?}, the program leaked {want:?}\n{got:#?}",
            got.get(site)
        );
    }
    for churn in ["churn", "churn_c", "churn_own"] {
        assert!(
            !got.contains_key(churn),
            "{fixture}: freed memory reported: {got:#?}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!("through {allocator} (")),
        "{fixture}: record should name {allocator} first: {first}"
    );
    if allocator == "jemalloc" {
        // Its free starts with instructions the kernel cannot emulate: the probe is placed at
        // its first branch, which it emulates (and it is not said to be single-stepped).
        let probed = report["meta"]["entry_points"][0]
            .as_str()
            .unwrap_or_default();
        assert!(probed.contains("free+48"), "{fixture}: {probed}");
        assert!(!first.contains("free single-stepped"), "{fixture}: {first}");
    }
    if allocator == "mimalloc" {
        // Its malloc, calloc and realloc copy their arguments to other registers and reuse
        // the first before any instruction the kernel emulates: the probes go to the first
        // branch and read the copies (the fixture's exact sizes below prove it), and none of
        // mimalloc's entry points is single-stepped.
        let probed = report["meta"]["entry_points"][0]
            .as_str()
            .unwrap_or_default();
        for place in ["malloc+21", "calloc+18", "realloc+20"] {
            assert!(probed.contains(place), "{fixture}: {place} in {probed}");
        }
        let mimalloc = first.split(" and ").next().unwrap_or_default();
        assert!(!mimalloc.contains("single-stepped"), "{fixture}: {first}");
    }
    assert!(
        report["meta"]["allocator"]
            .as_str()
            .unwrap()
            .starts_with(allocator),
        "{}",
        report["meta"]["allocator"]
    );
    assert_eq!(report["meta"]["counters"]["unknown_frees"], 0, "{fixture}");
    report
}

/// [`assert_exact`] for each (fixture, allocator it must name); the reports.
fn assert_each_exact(cases: &[(&str, &str)], args: &[&str]) -> Vec<Value> {
    cases
        .iter()
        .map(|(fixture, allocator)| assert_exact(fixture, args, allocator))
        .collect()
}

#[test]
fn c_functions_through_each_allocator() {
    let _g = lock();
    assert_each_exact(
        &[
            ("c-glibc", "glibc"),
            ("c-jemalloc", "jemalloc"),
            ("c-mimalloc", "mimalloc"),
            ("c-tcmalloc", "tcmalloc"),
        ],
        &["c"],
    );
}

/// jemalloc's mallocx/rallocx/sdallocx/dallocx, mimalloc's mi_* (whose sized and aligned frees
/// end in mi_free: counted once), tcmalloc's tc_*.
#[test]
fn each_allocators_own_api() {
    let _g = lock();
    assert_each_exact(
        &[
            ("c-jemalloc", "jemalloc"),
            ("c-mimalloc", "mimalloc"),
            ("c-tcmalloc", "tcmalloc"),
        ],
        &["own"],
    );
}

/// new and delete, scalar and array, nothrow, aligned, sized: on libstdc++ (operator new ends in
/// malloc; the site is its caller, operator new is not in the stack) and on allocators that
/// implement them (probed there; jemalloc's delete jumps to its free: counted once).
#[test]
fn cpp_new_and_delete_in_all_forms() {
    let _g = lock();
    let cases = [
        ("cpp-libstdcxx", "glibc"),
        ("cpp-jemalloc", "jemalloc"),
        ("cpp-mimalloc", "mimalloc"),
        ("cpp-tcmalloc", "tcmalloc"),
    ];
    for ((fixture, _), report) in cases.iter().zip(assert_each_exact(&cases, &[])) {
        for s in report["stacks"].as_array().unwrap() {
            for f in s["frames"].as_array().unwrap() {
                let name = f["function"].as_str().unwrap_or_default();
                assert!(
                    !name.starts_with("operator new"),
                    "{fixture}: operator new in a stack: {s}"
                );
            }
        }
    }
}

/// A message pool that keeps its buffers: without `--alloc-fn` the report sees only the
/// pool's own mallocs (21 buffers of 512 bytes, in bridge_pool_get); with it, the buffers
/// taken and never given back, at the site that took them.
#[test]
fn custom_pool_with_alloc_fn() {
    let _g = lock();
    let (_, _, got, _) = record_fixture("c-glibc", &["pool"], &[]);
    assert_eq!(
        got.get("bridge_pool_get"),
        Some(&(21 * 512, 21)),
        "{got:#?}"
    );
    assert!(!got.contains_key("pool_leak"));
    let (out, report, got, truth) = record_fixture(
        "c-glibc",
        &["pool"],
        &[
            "--alloc-fn",
            "bridge_pool_get:alloc",
            "--alloc-fn",
            "bridge_pool_put:free",
        ],
    );
    assert_eq!(truth.get("pool_leak"), Some(&(1500, 5)));
    assert_eq!(got.get("pool_leak"), truth.get("pool_leak"), "{got:#?}");
    assert!(!got.contains_key("pool_churn") && !got.contains_key("bridge_pool_get"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("custom (--alloc-fn)"), "{stderr}");
    let probed = report["meta"]["entry_points"].to_string();
    assert!(probed.contains("bridge_pool_get"), "{probed}");
    assert_eq!(report["meta"]["counters"]["unknown_frees"], 0);

    // A function the program does not have, and a kind that does not exist.
    let bad = |arg: &str, needle: &str| {
        let program = fixtures().join("c-glibc");
        let out = Command::new(BIN)
            .args(["record", "--alloc-fn", arg, "--"])
            .arg(&program)
            .args(["pool", "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(needle) && stderr.lines().count() == 1,
            "{stderr}"
        );
    };
    bad("no_such_pool_get:alloc", "no function no_such_pool_get in");
    bad("bridge_pool_get:borrow", "unknown kind");
}

/// A Go program allocates from Go's own heap: `record` says so in one line and attaches
/// nothing (Go programs can crash under return probes).
#[test]
fn go_program_is_refused_in_one_line() {
    let _g = lock();
    let dir = scratch("go");
    std::fs::write(
        dir.join("main.go"),
        "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello from go\") }\n",
    )
    .unwrap();
    let built = Command::new("go")
        .current_dir(&dir)
        .args(["build", "-o", "hello", "main.go"])
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("HOME", &dir)
        .output()
        .expect("go (cargo xtask setup installs golang-go)");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let out = Command::new(BIN)
        .args(["record", "-o"])
        .arg(dir.join("r.json"))
        .arg("--")
        .arg(dir.join("hello"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is a Go program"), "{stderr}");
    assert!(!dir.join("r.json").exists());
}

/// Builds `tests/fixtures/rust-jemalloc` (a release binary whose global allocator is
/// tikv-jemallocator, jemalloc linked in statically with the `_rjem_` prefix) once.
fn rust_jemalloc() -> &'static Path {
    static BIN_PATH: OnceLock<PathBuf> = OnceLock::new();
    BIN_PATH.get_or_init(|| {
        let target = Path::new(TMP).join("rust-jemalloc");
        let manifest = repo().join("tests/fixtures/rust-jemalloc/Cargo.toml");
        let out = Command::new(env!("CARGO"))
            .args(["build", "--release", "--locked", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("release/rust-jemalloc")
    })
}

/// Rust's allocation functions (and tikv-jemallocator's) between the site and jemalloc.
fn rust_allocator_frame(f: &str) -> bool {
    [
        "alloc::",
        "<alloc::",
        "core::",
        "<core::",
        "__rust",
        "__rdl",
        "tikv_jemallocator::",
    ]
    .iter()
    .any(|p| f.starts_with(p))
        || f.starts_with("<tikv_jemallocator::")
}

/// A Rust release binary with tikv-jemallocator: the executable itself is the allocator
/// (`jemalloc (static, _rjem_)`), traced through `_rjem_malloc`, `_rjem_mallocx`,
/// `_rjem_calloc`, `_rjem_rallocx`, `_rjem_sdallocx`...; each site exact.
#[test]
fn rust_binary_with_jemalloc_linked_in() {
    let _g = lock();
    let program = rust_jemalloc();
    let dir = scratch("alloc-rust-jemalloc");
    let (truth_path, out_json) = (dir.join("truth"), dir.join("r.json"));
    let out = record(&[
        "-o",
        out_json.to_str().unwrap(),
        "--",
        program.to_str().unwrap(),
        truth_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains("through jemalloc (static, _rjem_) ("),
        "{first}"
    );
    let report = json(&out_json);
    // The entry points probed are in the report (the start line counts them).
    let probed = report["meta"]["entry_points"].to_string();
    assert!(probed.contains("_rjem_sdallocx"), "{probed}");
    // The site: the innermost frame outside Rust's and tikv-jemallocator's allocation code.
    let got = sites_by(&report, |frames| {
        let site = frames.iter().rev().find(|f| !rust_allocator_frame(f))?;
        Some(site.rsplit("::").next().unwrap_or(site).to_string())
    });
    let truth = truth(&truth_path);
    assert_eq!(truth.len(), 4);
    for (site, want) in &truth {
        assert_eq!(got.get(site), Some(want), "site {site}: {got:#?}");
    }
    assert!(!got.contains_key("churn"), "{got:#?}");
    assert_eq!(report["meta"]["counters"]["unknown_frees"], 0);
}

/// Anonymous memory the program maps itself (mmap; mremap moves a region to the caller that
/// grew it) is reported as its own kind, under a `[anonymous mmap]` root frame, exactly; what
/// the allocator maps for its own blocks (glibc's 1 MiB malloc, jemalloc's extents) is not
/// counted again; regions given back are gone.
#[test]
fn program_mapped_memory_is_its_own_kind() {
    let _g = lock();
    for (fixture, allocator) in [("c-glibc", "glibc"), ("c-jemalloc", "jemalloc")] {
        let (_, report, _, truth) = record_fixture(fixture, &["mmap"], &[]);
        let mapped_root = |frames: &[&str]| frames[0] == "[anonymous mmap]";
        let mapped = sites_by(&report, |f| mapped_root(f).then(|| leaf(f)).flatten());
        let heap = sites_by(&report, |f| (!mapped_root(f)).then(|| leaf(f)).flatten());
        let want = |site: &str| truth.get(site).copied();
        let expected: Sites = ["mmap_leak", "remap_leak"]
            .iter()
            .map(|s| (s.to_string(), want(s).unwrap()))
            .collect();
        assert_eq!(
            mapped, expected,
            "{fixture} ({allocator}): the program's own mappings"
        );
        assert_eq!(
            heap.get("big_malloc_leak").copied(),
            want("big_malloc_leak"),
            "{heap:#?}"
        );
        assert!(!heap.contains_key("mmap_churn") && !mapped.contains_key("mmap_churn"));
    }
}
