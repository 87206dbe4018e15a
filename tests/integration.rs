//! Integration tests: the real `bridge-trace` binary, real eBPF (run as root), real fixture
//! programs that write down what they leaked per call site; every assertion compares the report
//! with that truth.
//!
//! The tests take a global lock: they load eBPF programs and one of them checks that none are
//! left behind, and the machine has two cores.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde_json::Value;

mod common;
use common::*;

/// Builds the fixtures once into the target's temporary directory.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(TMP).join("fixtures");
        std::fs::create_dir_all(&dir).unwrap();
        let src = repo().join("tests/fixtures");
        let s = |name: &str| src.join(name).to_str().unwrap().to_string();
        let o = |name: &str| dir.join(name).to_str().unwrap().to_string();
        // Frame pointers, and no tail calls, so each leak's direct caller is its call site.
        let cc = |args: &[&str]| {
            let mut all = vec![
                "-O1",
                "-g",
                "-fno-omit-frame-pointer",
                "-fno-optimize-sibling-calls",
                "-Wno-alloc-size-larger-than",
            ];
            all.extend_from_slice(args);
            gcc(&all);
        };
        let (shared, plugin, leaky) =
            (o("libleaky_shared.so"), o("libleaky_plugin.so"), o("leaky"));
        cc(&["-shared", "-fPIC", "-o", &shared, &s("libleaky_shared.c")]);
        cc(&["-shared", "-fPIC", "-o", &plugin, &s("leaky_plugin.c")]);
        let libdir = format!("-L{}", dir.display());
        let leaky_src = s("leaky.c");
        cc(&[
            "-pthread",
            "-o",
            &leaky,
            &leaky_src,
            &libdir,
            "-lleaky_shared",
            "-ldl",
            "-Wl,-rpath,$ORIGIN",
        ]);
        gcc(&[
            "-static",
            "-nostdlib",
            "-O1",
            "-o",
            &o("noalloc"),
            &s("noalloc.c"),
        ]);
        let demo_src = repo().join("demo/data-bridge.c");
        cc(&[
            "-pthread",
            "-o",
            &o("data-bridge"),
            demo_src.to_str().unwrap(),
        ]);
        dir
    })
}

fn assert_matches_truth(report: &Value, truth: &BTreeMap<String, (u64, u64)>) {
    let got = by_leaf(report);
    for (site, want) in truth {
        assert_eq!(
            got.get(site),
            Some(want),
            "call site {site}: report has {:?}, the fixture leaked (bytes, count) {want:?}\nall: {got:#?}",
            got.get(site)
        );
    }
}

fn counter(report: &Value, name: &str) -> u64 {
    report["meta"]["counters"][name].as_u64().unwrap()
}

/// The frames of the stack whose leaf is `leaf`, root first.
fn stack_of(report: &Value, leaf: &str) -> Vec<String> {
    report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["function"].as_str().unwrap_or("[unknown]").to_string())
                .collect::<Vec<_>>()
        })
        .find(|frames| frames.last().map(String::as_str) == Some(leaf))
        .unwrap_or_else(|| panic!("no stack ends in {leaf}"))
}

/// Launches `leaky MODE TRUTH` under `bridge-trace record [extra] -o r.json -- ...`, checks it
/// succeeded, and returns the JSON report and the fixture's truth.
fn record_fixture(mode: &str, extra: &[&str]) -> (Value, BTreeMap<String, (u64, u64)>) {
    let fx = fixtures();
    let dir = scratch(mode);
    let (truth_path, out_json) = (dir.join("truth"), dir.join("r.json"));
    let mut args = extra.to_vec();
    let leaky = fx.join("leaky");
    args.extend([
        "-o",
        out_json.to_str().unwrap(),
        "--",
        leaky.to_str().unwrap(),
        mode,
        truth_path.to_str().unwrap(),
    ]);
    let out = record(&args);
    assert_ok(&out);
    let report = json(&out_json);
    let truth = truth(&truth_path);
    assert_matches_truth(&report, &truth);
    (report, truth)
}

#[test]
fn launched_program_every_allocator_function_exact() {
    let _g = lock();
    let (report, truth) = record_fixture("all", &[]);
    assert_eq!(
        truth.len(),
        13,
        "one site per allocator function, shared lib, plugin: {truth:?}"
    );
    let got = by_leaf(&report);
    for churned in ["churn", "fail"] {
        assert!(
            !got.contains_key(churned),
            "{churned} freed all it allocated: {got:#?}"
        );
    }
    // malloc(huge), calloc overflow, posix_memalign(EINVAL), realloc(huge)
    assert_eq!(counter(&report, "failed_allocs"), 4);
    assert_eq!(counter(&report, "lost_returns"), 0);
    assert_eq!(counter(&report, "map_full_drops"), 0);
    assert_eq!(report["meta"]["target_exited"], true);
    // The call chain through the shared library and the dlopen'ed plugin, root to leaf.
    let shared = stack_of(&report, "shared_leak");
    assert_eq!(
        shared[shared.len() - 3..],
        ["main", "all", "shared_leak"],
        "{shared:?}"
    );
    let plugin = stack_of(&report, "plugin_leak");
    assert_eq!(
        plugin[plugin.len() - 3..],
        ["main", "all", "plugin_leak"],
        "{plugin:?}"
    );
    assert!(
        report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |s| s["frames"].as_array().unwrap().iter().any(|f| f["module"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("libleaky_plugin.so"))
            ),
        "the plugin's frames name their module"
    );
}

/// `-o -` writes the report to standard output (the summary moves to stderr), and an output
/// that is a device or FIFO node is written in place: `-o /dev/null` leaves the null device a
/// device (a rename over it once replaced it with a file, and every build on the machine broke).
#[test]
fn reports_go_to_stdout_and_devices_in_place() {
    let _g = lock();
    let dir = scratch("stdout");
    let truth_path = dir.join("truth");
    let leaky = fixtures().join("leaky");
    let leaky = leaky.to_str().unwrap();
    let out = record(&[
        "-o",
        "-",
        "-f",
        "json",
        "--",
        leaky,
        "all",
        truth_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report on stdout");
    assert_matches_truth(&report, &truth(&truth_path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrote standard output (Json)"), "{stderr}");

    let out = record(&[
        "-o",
        "/dev/null",
        "-f",
        "folded",
        "--",
        leaky,
        "exit",
        truth_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    use std::os::unix::fs::FileTypeExt as _;
    let kind = std::fs::symlink_metadata("/dev/null").unwrap().file_type();
    assert!(
        kind.is_char_device(),
        "/dev/null is no longer a device: {kind:?}"
    );
}

#[test]
fn launched_program_many_threads_exact() {
    let _g = lock();
    // 16 threads, each freeing blocks the main thread allocated for another: the program runs
    // and exits as untraced, its sites are exact, and those blocks are gone from the report.
    // (glibc's own blocks stay, such as the DTVs of the thread stacks it caches.)
    let (report, _truth) = traced_like_untraced("threads");
    let got = by_leaf(&report);
    assert!(!got.contains_key("handoff_alloc"), "{got:#?}");
}

#[test]
fn launched_program_leaving_through_underscore_exit() {
    let _g = lock();
    let (report, _truth) = traced_like_untraced("exit");
    let frames = stack_of(&report, "leak_malloc");
    assert_eq!(
        frames[frames.len() - 2..],
        ["main", "leak_malloc"],
        "{frames:?}"
    );
}

#[test]
fn min_age_keeps_only_old_allocations() {
    let _g = lock();
    let (report, _truth) = record_fixture("age", &["--min-age", "1s"]);
    let got = by_leaf(&report);
    assert!(!got.contains_key("leak_young"), "{got:#?}");
    assert!(report["meta"]["younger_than_min_age"].as_u64().unwrap() >= 1);
}

/// The allocation profile: what each site allocated while traced, freed or not (a realloc an
/// allocation of its new size), exactly as the program counts it, in the JSON report and in the
/// pprof profile's `alloc_space` as `go tool pprof` reads it; the leaks beside it unchanged.
#[test]
fn allocation_profile_is_exact() {
    let _g = lock();
    let out = scratch("churn-outputs");
    let pprof = out.join("r.pb.gz");
    let (report, _) = record_fixture("churn", &["-o", pprof.to_str().unwrap()]);
    let want = truth(&Path::new(TMP).join("runs/churn/truth.alloc"));
    assert_eq!(want.len(), 4, "{want:?}");
    let got = allocated_by_leaf(&report);
    for (site, w) in &want {
        assert_eq!(got.get(site), Some(w), "{site} allocated\nall: {got:#?}");
    }
    // The churning sites hold nothing.
    let held = by_leaf(&report);
    assert!(held.keys().all(|k| !k.starts_with("churn_")), "{held:#?}");
    for (index, site) in [
        ("alloc_space", "churn_malloc"),
        ("alloc_objects", "churn_realloc"),
    ] {
        let text = pprof_top(
            &pprof,
            &[&format!("-sample_index={index}"), "-nodefraction=0"],
        );
        let (bytes, count) = want[site];
        let value = if index == "alloc_space" { bytes } else { count };
        let row = text
            .lines()
            .find(|l| l.trim_end().ends_with(site))
            .unwrap_or_else(|| panic!("{site} missing: {text}"));
        // (`pprof_top` asks for -unit=B, which pprof writes after counts too.)
        assert!(
            row.trim_start().starts_with(&format!("{value}B ")),
            "{index} of {site}: want {value}: {row}"
        );
    }
}

/// Under the in-process sampler (1 KiB mean), the allocation profile is the unbiased estimate
/// of its weights: the sites that allocated megabytes within 25 % of what they allocated.
#[test]
fn sampler_estimates_what_each_site_allocated() {
    let _g = lock();
    let dir = scratch("churn-sampled");
    let (truth_path, out_json) = (dir.join("truth"), dir.join("r.json"));
    let out = Command::new(BIN)
        .args(["record", "--quiet", "--sampler", "-o"])
        .arg(&out_json)
        .arg("--")
        .arg(fixtures().join("leaky"))
        .arg("churn")
        .arg(&truth_path)
        .env("BRIDGE_TRACE_SAMPLE_INTERVAL", "1K")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&out);
    let report = json(&out_json);
    assert_eq!(report["meta"]["tier"], "usdt");
    let want = truth(&dir.join("truth.alloc"));
    let got = allocated_by_leaf(&report);
    let near = |got: u64, want: u64| (got as f64 - want as f64).abs() < 0.25 * want as f64;
    for site in ["churn_malloc", "churn_realloc"] {
        let (bytes, _) = want[site];
        let estimate = got.get(site).map_or(0, |e| e.0);
        eprintln!("{site}: allocated {bytes}, estimated {estimate}");
        assert!(
            near(estimate, bytes),
            "{site}: {estimate} for {bytes}\n{got:#?}"
        );
    }
    // One size at churn_malloc's: the count is the bytes' estimate over the size.
    let (_, count) = want["churn_malloc"];
    assert!(
        near(got["churn_malloc"].1, count),
        "{:?} for {count}",
        got["churn_malloc"]
    );
}

/// Starts the `wait` fixture and returns it once it has allocated its early blocks.
fn start_waiting_fixture(truth_path: &Path) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(fixtures().join("leaky"))
        .args(["wait", truth_path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    (child, stdout)
}

#[test]
fn attach_to_running_process_by_pid() {
    let _g = lock();
    let dir = scratch("pid");
    let (truth_path, out_json) = (dir.join("truth"), dir.join("r.json"));
    let (mut fixture, mut fixture_out) = start_waiting_fixture(&truth_path);
    let pid = fixture.id().to_string();
    let (tracer, _stderr) = start_tracer(&[
        "--pid",
        &pid,
        "--duration",
        "3s",
        "-o",
        out_json.to_str().unwrap(),
    ]);
    signal(&fixture, libc::SIGUSR1);
    let mut line = String::new();
    fixture_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "leaked");
    let out = tracer.wait_with_output().unwrap();
    assert_ok(&out);
    // The traced process is unharmed and still running after the tracer detached.
    assert!(fixture.try_wait().unwrap().is_none(), "the fixture died");
    signal(&fixture, libc::SIGTERM);
    let status = fixture.wait().unwrap();
    assert!(status.success(), "fixture: {status:?}");

    let report = json(&out_json);
    assert_matches_truth(&report, &truth(&truth_path));
    let got = by_leaf(&report);
    assert!(
        !got.contains_key("early_alloc"),
        "allocated before attaching: {got:#?}"
    );
    // The 50 early blocks were freed while traced: frees of memory allocated before attaching.
    assert!(
        counter(&report, "unknown_frees") >= 50,
        "{}",
        report["meta"]
    );
    assert_eq!(report["meta"]["target_exited"], false);
}

#[test]
fn demo_leak_site_tops_the_report() {
    let _g = lock();
    let fx = fixtures();
    let dir = scratch("demo");
    let truth_path = dir.join("truth");
    let (svg, folded, json_path, text) = (
        dir.join("l.svg"),
        dir.join("l.folded"),
        dir.join("l.json"),
        dir.join("l.txt"),
    );
    let out = record(&[
        "-o",
        svg.to_str().unwrap(),
        "-o",
        folded.to_str().unwrap(),
        "-o",
        json_path.to_str().unwrap(),
        "-o",
        text.to_str().unwrap(),
        "--",
        fx.join("data-bridge").to_str().unwrap(),
        "--messages",
        "5000",
        "--rate",
        "0",
        "--truth",
        truth_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let truth = truth(&truth_path);
    let (bytes, count) = truth["reject_message"];
    assert!(count >= 100);
    let report = json(&json_path);
    let top = &report["stacks"][0];
    assert_eq!(top["bytes"].as_u64().unwrap(), bytes);
    assert_eq!(top["count"].as_u64().unwrap(), count);
    let frames = stack_of(&report, "reject_message");
    assert_eq!(
        frames[frames.len() - 3..],
        ["consumer", "handle_message", "reject_message"]
    );
    // Every block the program frees was recorded: no unknown frees. What glibc frees itself
    // at its two threads' exit (their caches' chunks) is counted apart, by its cause.
    assert_eq!(
        counter(&report, "unknown_frees"),
        0,
        "{}",
        report["meta"]["counters"]
    );
    assert!(counter(&report, "internal_frees") > 0);
    let folded = std::fs::read_to_string(&folded).unwrap();
    assert!(
        folded
            .lines()
            .any(|l| l.ends_with(&format!(";handle_message;reject_message {bytes}"))),
        "{folded}"
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("reject_message") && svg.contains("bytes"));
    let text = std::fs::read_to_string(&text).unwrap();
    assert!(text.contains(&format!("#1 {bytes} bytes")), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("reject_message"), "{stdout}");
}

/// `bridge-trace diff`: the demo recorded twice, moving 2 000 then 6 000 messages; the site that
/// grew most is its leak, by exactly the difference of what the demo says it leaked.
#[test]
fn diff_of_two_recordings_names_the_growth() {
    let _g = lock();
    let dir = scratch("diff");
    let run = |messages: &str, name: &str| {
        let (truth_path, out_json) = (
            dir.join(format!("{name}.truth")),
            dir.join(format!("{name}.json")),
        );
        let out = record(&[
            "-o",
            out_json.to_str().unwrap(),
            "--",
            fixtures().join("data-bridge").to_str().unwrap(),
            "--messages",
            messages,
            "--rate",
            "0",
            "--truth",
            truth_path.to_str().unwrap(),
        ]);
        assert_ok(&out);
        (out_json, truth(&truth_path)["reject_message"].0)
    };
    let (before, leaked_before) = run("2000", "before");
    let (after, leaked_after) = run("6000", "after");
    let (svg, txt) = (dir.join("d.svg"), dir.join("d.txt"));
    let out = Command::new(BIN)
        .args(["diff", before.to_str().unwrap(), after.to_str().unwrap()])
        .args(["-o", svg.to_str().unwrap(), "-o", txt.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    let top: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        (top[0], top[1], top[2], top[3]),
        (
            format!("+{}", leaked_after - leaked_before).as_str(),
            leaked_before.to_string().as_str(),
            leaked_after.to_string().as_str(),
            "reject_message"
        ),
        "{table}"
    );
    assert_eq!(std::fs::read_to_string(&txt).unwrap(), table);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.starts_with("<?xml") && svg.contains("reject_message"),
        "{svg}"
    );
    // Bad input: one line, exit 2, nothing written.
    let bad = dir.join("bad.folded");
    std::fs::write(&bad, "main;leak 12\nthis is not folded\n").unwrap();
    let out_svg = dir.join("never.svg");
    let out = Command::new(BIN)
        .args(["diff", bad.to_str().unwrap(), after.to_str().unwrap(), "-o"])
        .arg(&out_svg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 2: not folded stacks"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!out_svg.exists());
}

// ---- the fault matrix: the target behaves as it does untraced, the report is exact ----

/// Runs `leaky MODE TRUTH` untraced, then under `record -o r.json --`: the same output, the same
/// exit status (bridge-trace passes a launched command's on, 128 + N for signal N), and a report
/// whose bytes per call site are the fixture's own truth. Returns the report.
fn traced_like_untraced(mode: &str) -> (Value, BTreeMap<String, (u64, u64)>) {
    traced_like_untraced_with(mode, &[])
}

/// [`traced_like_untraced`] with more `record` arguments.
fn traced_like_untraced_with(mode: &str, extra: &[&str]) -> (Value, BTreeMap<String, (u64, u64)>) {
    let dir = scratch(&format!("fault-{mode}"));
    let leaky = fixtures().join("leaky");
    let truth_path = dir.join("truth");
    let untraced = Command::new(&leaky)
        .args([mode, truth_path.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt as _;
    let shell_status = |s: std::process::ExitStatus| {
        s.code()
            .unwrap_or_else(|| 128 + s.signal().expect("a code or a signal"))
    };
    let want_status = shell_status(untraced.status);
    let out_json = dir.join("r.json");
    let mut args = extra.to_vec();
    args.extend([
        "-o",
        out_json.to_str().unwrap(),
        "--",
        leaky.to_str().unwrap(),
        mode,
        truth_path.to_str().unwrap(),
    ]);
    let traced = record(&args);
    let stderr = String::from_utf8_lossy(&traced.stderr);
    assert_eq!(
        traced.status.code(),
        Some(want_status),
        "{mode}: bridge-trace should exit as the target did\n{stderr}"
    );
    // The target's own output comes first, bridge-trace's summary after it.
    assert!(
        traced.stdout.starts_with(&untraced.stdout),
        "{mode}: the target's output changed: {:?} vs {:?}",
        String::from_utf8_lossy(&untraced.stdout),
        String::from_utf8_lossy(&traced.stdout)
    );
    let report = json(&out_json);
    let truth = truth(&truth_path);
    assert_matches_truth(&report, &truth);
    assert_eq!(report["meta"]["target_exited"], true, "{mode}");
    (report, truth)
}

#[test]
fn target_aborting_or_killed_mid_recording() {
    let _g = lock();
    for mode in ["abort", "killed"] {
        let (report, truth) = traced_like_untraced(mode);
        assert_eq!(truth.len(), 2, "{truth:?}");
        assert_eq!(counter(&report, "map_full_drops"), 0, "{mode}");
    }
}

/// `leaky MODE` traced as it runs untraced, and a report with exactly the truth's sites: not
/// `absent`, which `why` explains.
fn exactly_the_truth_without(mode: &str, absent: &str, why: &str) {
    let (report, truth) = traced_like_untraced(mode);
    let got = by_leaf(&report);
    assert!(!got.contains_key(absent), "{why}: {got:#?}");
    assert_eq!(got.len(), truth.len(), "{got:#?}");
}

/// A forked child's allocations are its own process's: none are mixed into the parent's report.
#[test]
fn target_forking_keeps_the_child_out() {
    let _g = lock();
    exactly_the_truth_without(
        "fork",
        "child_leak",
        "the child's leak in the parent's report",
    );
}

/// `--follow-children`: the forked child is traced from its first instruction as a process of
/// its own. The report holds two processes, each stack under its process's root frame; the
/// parent's stacks are exactly its truth and the child's exactly the child's (3 × 7777 bytes
/// in `child_leak`), and the target runs and exits as it does untraced.
#[test]
fn followed_children_are_processes_of_their_own() {
    let _g = lock();
    let (report, truth) = traced_like_untraced_with("fork", &["--follow-children"]);
    let processes = report["meta"]["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 2, "{processes:?}");
    let (parent, child) = (&processes[0], &processes[1]);
    assert_eq!(parent["pid"], report["meta"]["pid"]);
    assert_eq!(child["parent"], parent["pid"]);
    let root = |p: &Value| format!("{} [pid {}]", p["name"].as_str().unwrap(), p["pid"]);
    let of = |p: &Value| {
        let root = root(p);
        sites_by(&report, |frames| {
            (frames[0] == root).then(|| leaf(frames)).flatten()
        })
    };
    assert_eq!(of(parent), truth, "the parent's stacks");
    let dir = Path::new(TMP).join("runs/fault-fork");
    let child_truth = common::truth(&dir.join("truth.child"));
    assert_eq!(of(child), child_truth, "the child's stacks");
    let all = by_leaf(&report);
    assert_eq!(all.len(), truth.len() + child_truth.len(), "{all:#?}");
    assert_eq!(counter(&report, "child_stops"), 1);
    // The child freed its copy of a block of its parent's: said so, not "allocated before
    // tracing"; the parent's own free of it is known.
    assert_eq!(counter(&report, "inherited_frees"), 1);
    assert_eq!(
        counter(&report, "unknown_frees"),
        0,
        "{}",
        report["meta"]["counters"]
    );
}

/// SIGTERM to `record -- CMD` at every stage of its start (before the fork, while the program
/// waits at the gate, while it is held for its tables, once it runs): the program is never left
/// stopped, and bridge-trace still exits cleanly.
#[test]
fn sigterm_during_start_never_leaves_the_program_stopped() {
    let _g = lock();
    let leaky = fixtures().join("leaky");
    for delay_ms in [0u64, 5, 20, 50, 80, 120, 160, 200, 260, 350, 500] {
        let dir = scratch(&format!("sigterm-{delay_ms}"));
        let marker = dir.join("truth-sigterm");
        let mut tracer = Command::new(BIN)
            .args(["record", "--no-raw", "--quiet", "-o"])
            .arg(dir.join("st.txt"))
            .arg("--")
            .arg(&leaky)
            .arg("wait")
            .arg(&marker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The stage under test is this far into the start.
        std::thread::sleep(Duration::from_millis(delay_ms));
        signal(&tracer, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = tracer.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "record did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let programs = processes_with_arg(&marker);
        let states: Vec<(u32, Option<char>)> = programs
            .iter()
            .map(|&pid| (pid, process_state(pid)))
            .collect();
        for pid in &programs {
            // SAFETY: plain syscall on the fixture this test started.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        // The program shares record's stderr: read it once the program is gone.
        let mut stderr = String::new();
        let _ = tracer.stderr.take().unwrap().read_to_string(&mut stderr);
        for (pid, state) in states {
            assert!(
                !matches!(state, Some('T' | 't')),
                "after SIGTERM at {delay_ms} ms the program (pid {pid}) was left stopped; \
                 record: {status:?}\n{stderr}"
            );
        }
        // Killed before its handlers were installed (before main), bridge-trace had launched
        // nothing; after that it stops cleanly.
        use std::os::unix::process::ExitStatusExt as _;
        let early = status.signal() == Some(libc::SIGTERM) && programs.is_empty();
        assert!(
            status.success() || early,
            "at {delay_ms} ms: {status:?}\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Pids of the processes with `arg` among their arguments.
fn processes_with_arg(arg: &Path) -> Vec<u32> {
    let want = arg.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == want))
        })
        .collect()
}

/// The state letter of /proc/PID/stat (R, S, T, ...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// `record -- ./start.sh`, a `#!/bin/sh` script the way many services start: what the script
/// runs is traced, through `exec` and as a child of the shell, each leak exactly the program's
/// own; the start says it is a script.
#[test]
fn script_is_traced_through_what_it_runs() {
    let _g = lock();
    let leaky = fixtures().join("leaky");
    for (name, body) in [
        ("exec", format!("exec {} exit \"$1\"\n", leaky.display())),
        // As a child of the shell (one that runs long enough for its new image's maps to be
        // read while it lives: see the closing note of issue 15).
        (
            "child",
            format!(
                "echo starting\n{} age \"$1\"\necho stopped\n",
                leaky.display()
            ),
        ),
    ] {
        let dir = scratch(&format!("script-{name}"));
        let script = dir.join("start.sh");
        std::fs::write(&script, format!("#!/bin/sh\n# start the service\n{body}")).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (truth_path, out_json) = (dir.join("truth"), dir.join("r.json"));
        let out = record(&[
            "-o",
            out_json.to_str().unwrap(),
            "--",
            script.to_str().unwrap(),
            truth_path.to_str().unwrap(),
        ]);
        assert_ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("is a script run by /usr/bin/sh")
                || stderr.contains("is a script run by /bin/sh"),
            "{name}: {stderr}"
        );
        let report = json(&out_json);
        assert_matches_truth(&report, &truth(&truth_path));
    }
}

/// After an exec, what the old image held is gone with it (no free is ever seen for it): the
/// report is the new program's alone.
#[test]
fn target_execing_reports_the_new_image_only() {
    let _g = lock();
    exactly_the_truth_without(
        "exec",
        "pre_exec_leak",
        "the old image's blocks outlived the exec",
    );
}

/// A live-allocation map far too small: the drops are counted, the report and its metadata say
/// the totals are lower bounds, and no site shows more than it leaked.
#[test]
fn full_maps_are_counted_and_said() {
    let _g = lock();
    let dir = scratch("map-full");
    let (truth_path, out_json) = (dir.join("truth"), dir.join("r.json"));
    let out = record(&[
        "--max-allocs",
        "4",
        "-o",
        out_json.to_str().unwrap(),
        "--",
        fixtures().join("leaky").to_str().unwrap(),
        "all",
        truth_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let report = json(&out_json);
    let truth = truth(&truth_path);
    let drops = counter(&report, "map_full_drops");
    assert!(drops > 0, "{}", report["meta"]);
    let caveats = report["meta"]["caveats"].to_string();
    assert!(
        caveats.contains(&format!("{drops} allocations were not recorded")),
        "{caveats}"
    );
    assert!(caveats.contains("lower bounds"), "{caveats}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("lower bounds"), "{stdout}");
    let got = by_leaf(&report);
    for (site, (bytes, count)) in &got {
        if let Some((want_bytes, want_count)) = truth.get(site) {
            assert!(
                bytes <= want_bytes && count <= want_count,
                "{site}: {got:#?}"
            );
        }
    }
    let reported: u64 = truth.keys().filter_map(|k| got.get(k)).map(|v| v.0).sum();
    let leaked: u64 = truth.values().map(|v| v.0).sum();
    assert!(
        reported < leaked,
        "{reported} of {leaked} bytes with a 4-entry map"
    );
}

/// A container-like target: its own mount namespace and root, its libc at a path the host does
/// not have (`/opt/glibc/libc.so.6`, loaded by an explicitly run loader). The probes are placed
/// on that libc through /proc/PID/root, and the report is exact.
#[test]
fn container_like_target_with_its_own_libc_path() {
    let _g = lock();
    let dir = scratch("container");
    let root = dir.join("root");
    let glibc = root.join("opt/glibc");
    std::fs::create_dir_all(&glibc).unwrap();
    let fx = fixtures();
    for (from, to) in [
        (fx.join("leaky"), root.join("leaky")),
        (
            fx.join("libleaky_shared.so"),
            root.join("libleaky_shared.so"),
        ),
        (
            PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
            glibc.join("libc.so.6"),
        ),
        (
            PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            glibc.join("ld-linux-x86-64.so.2"),
        ),
    ] {
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }
    assert!(
        !Path::new("/opt/glibc/libc.so.6").exists(),
        "the host must not have the path"
    );
    // Killed if an assertion fails: a chrooted fixture left behind would wait forever.
    let mut fixture = KillOnDrop(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "chroot"])
            .arg(&root)
            .args([
                "/opt/glibc/ld-linux-x86-64.so.2",
                "--library-path",
                "/opt/glibc:/",
                "/leaky",
                "wait",
                "/truth",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut fixture_out = BufReader::new(fixture.0.stdout.take().unwrap());
    let mut line = String::new();
    fixture_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = fixture.0.id().to_string();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("/opt/glibc/libc.so.6"), "{maps}");
    let out_json = dir.join("r.json");
    let (tracer, _stderr) = start_tracer(&["--pid", &pid, "-o", out_json.to_str().unwrap()]);
    signal(&fixture.0, libc::SIGUSR1);
    line.clear();
    fixture_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "leaked");
    signal(&tracer, libc::SIGINT);
    let out = tracer.wait_with_output().unwrap();
    assert_ok(&out);
    signal(&fixture.0, libc::SIGTERM);
    assert!(
        fixture.0.wait().unwrap().success(),
        "the fixture was harmed"
    );
    let report = json(&out_json);
    assert_matches_truth(&report, &truth(&root.join("truth")));
}

/// Through sudo, a launched command runs as the invoking user, not as root, and the report is
/// that user's, private (0600) unless `--mode` says otherwise.
#[test]
fn under_sudo_the_command_and_the_report_belong_to_the_user() {
    use std::os::unix::fs::MetadataExt as _;
    let _g = lock();
    let dir = scratch("sudo");
    for (mode, want) in [(None, 0o600), (Some("640"), 0o640)] {
        let out_json = dir.join("r.json");
        let mut args = vec!["record", "--quiet", "-o", out_json.to_str().unwrap()];
        if let Some(m) = mode {
            args.extend(["--mode", m]);
        }
        args.extend(["--", "/usr/bin/id", "-u"]);
        let out = Command::new(BIN)
            .args(&args)
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_ok(&out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("65534\n"),
            "the command ran as: {stdout}"
        );
        let meta = std::fs::metadata(&out_json).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{mode:?}");
        assert_eq!(meta.mode() & 0o777, want, "{mode:?}");
    }
}

#[test]
fn no_probe_left_after_the_tracer_is_killed() {
    let _g = lock();
    let dir = scratch("sigkill");
    let truth_path = dir.join("truth");
    let out_svg = dir.join("r.svg");
    let (mut fixture, mut fixture_out) = start_waiting_fixture(&truth_path);
    let pid = fixture.id().to_string();
    let (mut tracer, _stderr) = start_tracer(&["--pid", &pid, "-o", out_svg.to_str().unwrap()]);
    assert!(
        our_programs_loaded(),
        "bpftool should see the probes while tracing"
    );
    tracer.kill().unwrap(); // SIGKILL
    tracer.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while our_programs_loaded() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!our_programs_loaded(), "probes left behind after SIGKILL");
    assert!(
        !out_svg.exists(),
        "no report from a killed tracer, and no partial one"
    );
    // The target keeps running, unharmed, and still allocates and frees normally.
    signal(&fixture, libc::SIGUSR1);
    let mut line = String::new();
    fixture_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "leaked");
    signal(&fixture, libc::SIGTERM);
    assert!(fixture.wait().unwrap().success());
}

/// Issue 15: the probes are multi-uprobe links, one per program and object, detached
/// together in a grace period or two instead of one grace period per perf-event uprobe, one
/// after another (2.4 s for glibc's 24, 7.5 s for jemalloc's 75 before). Each way traces the
/// fixture exactly; the perf-event way (`BRIDGE_TRACE_PERF_UPROBES=1`) still says what it is
/// detaching after the report; nothing stays attached after either.
#[test]
fn probes_are_multi_uprobe_links_and_none_stays() {
    let _g = lock();
    let dir = scratch("links");
    for perf in [false, true] {
        let (truth_path, out_json) = (dir.join("truth"), dir.join("r.json"));
        let (fixture, mut fixture_out) = start_waiting_fixture(&truth_path);
        let mut fixture = KillOnDrop(fixture);
        let pid = fixture.0.id().to_string();
        let mut tracer = KillOnDrop(
            Command::new(BIN)
                .args(["record", "--quiet", "--no-raw", "--pid", &pid, "-o"])
                .arg(&out_json)
                .env("BRIDGE_TRACE_PERF_UPROBES", if perf { "1" } else { "0" })
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut stderr = BufReader::new(tracer.0.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains("tracing"), "unexpected first line: {line}");
        let (multi, perf_events) = bpf_links_of(tracer.0.id());
        if perf {
            assert_eq!(multi, 0);
            assert!(perf_events >= 12, "{perf_events} perf-event links");
        } else {
            // free, alloc_return, one per allocation kind, the growth probes: one link each.
            assert!((8..=24).contains(&multi), "{multi} multi-uprobe links");
            assert_eq!(perf_events, 0, "no perf-event uprobe besides the links");
        }
        signal(&fixture.0, libc::SIGUSR1);
        let mut got = String::new();
        fixture_out.read_line(&mut got).unwrap();
        assert_eq!(got.trim(), "leaked");
        signal(&tracer.0, libc::SIGINT);
        let status = tracer.0.wait().unwrap();
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        assert!(status.success(), "{status:?}\n{rest}");
        if perf {
            assert!(rest.contains("report written; detaching "), "{rest}");
        }
        assert_matches_truth(&json(&out_json), &truth(&truth_path));
        let deadline = Instant::now() + Duration::from_secs(5);
        while our_programs_loaded() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!our_programs_loaded(), "probes left behind (perf: {perf})");
        signal(&fixture.0, libc::SIGTERM);
        assert!(
            fixture.0.wait().unwrap().success(),
            "the fixture was harmed"
        );
    }
}

/// The multi-uprobe links and the perf-event links (or bare perf events) process `pid` holds.
fn bpf_links_of(pid: u32) -> (usize, usize) {
    let (mut multi, mut perf) = (0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        let name = fd.file_name();
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", name.to_string_lossy()))
                .unwrap_or_default();
        let link_type = info
            .lines()
            .find_map(|l| l.strip_prefix("link_type:"))
            .map(str::trim);
        match link_type {
            Some("uprobe_multi") => multi += 1,
            Some("perf") => perf += 1,
            _ if target.contains("perf_event") => perf += 1,
            _ => {}
        }
    }
    (multi, perf)
}

/// Whether the kernel has any of bridge-trace's programs loaded (its own view, via bpftool).
fn our_programs_loaded() -> bool {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("name malloc_enter") || text.contains("name free_enter")
}

/// Runs `bridge-trace ARGS` as the unprivileged user nobody, and checks it succeeded.
fn as_nobody(args: &[&str]) -> std::process::Output {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&out);
    out
}

/// Issue 7's round trip: `record -- leaky all` writes the raw capture beside its outputs; once
/// the process is gone, `bridge-trace report` run as an unprivileged user renders it in every
/// format, its folded stacks byte-identical to those written at record time and its bytes the
/// fixture's truth. With the traced binaries moved away their frames are left unnamed, and
/// `report` says which and why; `--debug-dir` pointing at them names them again, identically.
#[test]
fn raw_capture_renders_again_later_without_root() {
    let _g = lock();
    let fx = fixtures();
    let dir = scratch("capture");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for f in ["leaky", "libleaky_shared.so", "libleaky_plugin.so"] {
        std::fs::copy(fx.join(f), bin.join(f)).unwrap();
    }
    let (truth_path, folded) = (dir.join("truth"), dir.join("r.folded"));
    let leaky = bin.join("leaky");
    let out = record(&[
        "--mode",
        "644",
        "-o",
        folded.to_str().unwrap(),
        "--",
        leaky.to_str().unwrap(),
        "all",
        truth_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let capture = dir.join("r.btcap");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(&format!("wrote {} (raw capture", capture.display())),
        "{summary}"
    );
    let at_record = std::fs::read_to_string(&folded).unwrap();
    let truth = truth(&truth_path);

    // Later, as nobody, into a directory of its own.
    let later = dir.join("later");
    std::fs::create_dir(&later).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for d in [&dir, &later] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let o = |name: &str| later.join(name).to_str().unwrap().to_string();
    let c = capture.to_str().unwrap();
    let formats = ["y.folded", "y.svg", "y.json", "y.txt", "y.pb.gz", "y.html"];
    let mut args = vec!["report", c, "--top", "100"];
    let paths: Vec<String> = formats.iter().map(|f| o(f)).collect();
    for p in &paths {
        args.extend(["-o", p.as_str()]);
    }
    let out = as_nobody(&args);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "every frame named"
    );
    assert_eq!(std::fs::read_to_string(o("y.folded")).unwrap(), at_record);
    let report = json(Path::new(&o("y.json")));
    assert_matches_truth(&report, &truth);
    assert_eq!(report["meta"]["exe"], leaky.to_str().unwrap());
    assert_eq!(report["meta"]["tier"], "full");
    let text = std::fs::read_to_string(o("y.txt")).unwrap();
    let html = std::fs::read_to_string(o("y.html")).unwrap();
    for site in truth.keys() {
        assert!(
            text.contains(site.as_str()),
            "{site} not in the text report"
        );
        assert!(
            html.contains(site.as_str()),
            "{site} not in the html report"
        );
    }
    let top = pprof_top(Path::new(&o("y.pb.gz")), &["-nodecount=50"]);
    let total: u64 = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert!(top.contains(&format!("{total}B total")), "{top}");
    // The default: the text report on standard output.
    let out = as_nobody(&["report", c, "--top", "100"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);

    // The binaries moved away: unnamed, and said why.
    let moved = dir.join("moved");
    std::fs::rename(&bin, &moved).unwrap();
    let out = as_nobody(&["report", c, "-o", &o("z.folded")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "left unnamed: {} is not on this machine",
            leaky.display()
        )) && stderr.contains("--debug-dir"),
        "{stderr}"
    );
    // Unnamed frames keep their module and offset, so distinct functions stay apart.
    let unnamed = std::fs::read_to_string(o("z.folded")).unwrap();
    assert!(
        unnamed.contains(";leaky+0x") && !unnamed.contains("[unknown]") && unnamed != at_record,
        "{unnamed}"
    );
    // Another build under the same name in --debug-dir: said so, not "not on this machine".
    let other = dir.join("other-build");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(fixtures().join("noalloc"), other.join("leaky")).unwrap();
    let out = as_nobody(&[
        "report",
        c,
        "--debug-dir",
        other.to_str().unwrap(),
        "-o",
        &o("v.folded"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("is another build of {}", leaky.display()))
            && stderr.contains("build-id"),
        "{stderr}"
    );
    // Named again from where they are now.
    let out = as_nobody(&[
        "report",
        c,
        "--debug-dir",
        moved.to_str().unwrap(),
        "-o",
        &o("w.folded"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert_eq!(std::fs::read_to_string(o("w.folded")).unwrap(), at_record);
}

// ---- errors: one line, documented exit code, no output file ----

fn assert_error(args: &[&str], exit: i32, needle: &str, output: &Path) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(exit), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected '{needle}' in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.lines().count() <= 2, "not one clear line: {stderr}");
    assert!(!output.exists(), "{} was written", output.display());
    let leftovers: Vec<_> = output
        .parent()
        .and_then(|d| std::fs::read_dir(d).ok())
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn errors_are_one_line_with_no_output_file() {
    let _g = lock();
    let fx = fixtures();
    let dir = scratch("errors");
    let out = dir.join("out.svg");
    let o = out.to_str().unwrap();
    assert_error(
        &["record", "--pid", "2147483647", "-o", o],
        4,
        "no process with PID 2147483647",
        &out,
    );
    assert_error(&["record", "--pid", "2", "-o", o], 4, "kernel thread", &out);
    assert_error(
        &["record", "--pid", "1", "--duration", "abc", "-o", o],
        2,
        "invalid duration 'abc'",
        &out,
    );
    assert_error(
        &["record", "--pid", "1", "--min-age=-5", "-o", o],
        2,
        "invalid duration",
        &out,
    );
    assert_error(
        &["record", "--pid", "1", "-o", "/nonexistent-dir/x.svg"],
        2,
        "does not exist",
        &out,
    );
    assert_error(
        &[
            "record",
            "--pid",
            "1",
            "-o",
            dir.to_str().unwrap(),
            "-f",
            "svg",
        ],
        2,
        "is a directory",
        &out,
    );
    assert_error(
        &["record", "--pid", "1", "-o", o, "--", "true"],
        2,
        "not both",
        &out,
    );
    assert_error(&["record", "-o", o], 2, "nothing to trace", &out);
    assert_error(
        &["record", "-o", o, "--", "/nonexistent/program"],
        4,
        "no such file",
        &out,
    );
    assert_error(
        &["record", "-o", o, "--", "/etc/hostname"],
        4,
        "not an ELF",
        &out,
    );

    // Raw captures that are not, are cut short, damaged, or from a later bridge-trace.
    let inputs = scratch("errors-inputs");
    let good = std::fs::read(repo().join("tests/data/capture-v1.btcap")).unwrap();
    let bad = |name: &str, bytes: &[u8]| {
        let p = inputs.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    let mut future = good.clone();
    future[8..12].copy_from_slice(&99u32.to_le_bytes());
    for (input, needle) in [
        (bad("hostname", b"web-3\n"), "not a bridge-trace capture"),
        (
            bad("cut.btcap", &good[..good.len() / 2]),
            "truncated capture",
        ),
        (bad("header.btcap", &good[..6]), "truncated capture"),
        (bad("flipped.btcap", &flipped), "corrupted capture"),
        (
            bad("future.btcap", &future),
            "capture format version 99 is newer",
        ),
        ("/nonexistent.btcap".to_string(), "No such file"),
    ] {
        assert_error(&["report", &input, "-o", o], 2, needle, &out);
    }
    assert_error(
        &[
            "report",
            &bad("ok.btcap", &good),
            "--debug-dir",
            "/etc/hostname",
            "-o",
            o,
        ],
        2,
        "--debug-dir /etc/hostname: not a directory",
        &out,
    );

    // A read-only directory: a read-only bind mount, in a mount namespace of its own.
    let ro = scratch("errors-ro");
    let out_ro = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec {BIN} record --pid 1 \
             -o {d}/x.svg",
            d = ro.display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out_ro.stderr);
    assert_eq!(out_ro.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not writable"), "{stderr}");
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);

    // A static binary with no allocator at all.
    let mut noalloc = Command::new(fx.join("noalloc")).spawn().unwrap();
    let pid = noalloc.id().to_string();
    assert_error(
        &["record", "--pid", &pid, "-o", o],
        4,
        "no allocator found",
        &out,
    );
    noalloc.kill().unwrap();
    noalloc.wait().unwrap();

    // Not root: the same command as an unprivileged user.
    let status = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([
            BIN,
            "record",
            "--pid",
            "1",
            "-o",
            "/tmp/bridge-trace-not-root.svg",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("not permitted") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
    assert!(!Path::new("/tmp/bridge-trace-not-root.svg").exists());
}
