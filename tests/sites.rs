//! Sites that mean something on real programs (tests/fixtures/wrappers.cpp, built -O2 without
//! frame pointers): a leak is named at the first frame above the allocator that is not an
//! allocation wrapper — well-known ones (xmalloc, the C++ operators, glibc's strdup), detected
//! ones (named like an allocator, two callers) and `--wrapper` ones — in `record`'s JSON, text
//! and summary, in pprof (`drop_frames`, as `go tool pprof` reads it) and in `top`; identical
//! stacks are one; glibc's frames have their public names; a stripped binary's frames keep
//! their module and offset.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use serde_json::Value;

mod common;
use common::*;

/// The fixture, and a stripped copy of it.
fn fixture() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = Path::new(TMP).join("sites");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("wrappers");
        build_wrappers(&out);
        let stripped = dir.join("wrappers-stripped");
        let ok = Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(&out)
            .status()
            .unwrap();
        assert!(ok.success());
        (out, stripped)
    })
}

/// Records the fixture with `extra` arguments: (report, text report, folded, summary, truth).
fn record_wrappers(
    program: &Path,
    name: &str,
    extra: &[&str],
) -> (Value, String, String, String, Sites, PathBuf) {
    let dir = scratch(name);
    let o = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for f in ["r.json", "r.txt", "r.folded", "r.pb.gz"] {
        args.extend(["-o".into(), o(f)]);
    }
    args.extend([
        "--".into(),
        program.to_str().unwrap().into(),
        "wrappers".into(),
        o("truth"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = record(&args);
    assert_ok(&out);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    (
        json(&dir.join("r.json")),
        read("r.txt"),
        read("r.folded"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        truth(&dir.join("truth")),
        dir.join("r.pb.gz"),
    )
}

/// Starts the fixture leaking through every wrapper until it is killed, and waits for its
/// "ready"; killed if a failed assertion unwinds.
fn start_serving(bin: &Path) -> KillOnDrop {
    spawn_ready(Command::new(bin).arg("serve"))
}

/// Every function name of a report, frames and wrappers.
fn all_names(report: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for s in report["stacks"].as_array().unwrap() {
        for key in ["frames", "wrappers"] {
            for f in s[key].as_array().into_iter().flatten() {
                if let Some(n) = f["function"].as_str() {
                    names.push(n.to_string());
                }
            }
        }
    }
    names
}

/// Each leak at its caller, with the fixture's exact bytes and counts; the wrappers it went
/// through kept beside the stack; one stack for make_buffer's two calls on one line.
#[test]
fn leaks_are_named_past_their_wrappers() {
    let _g = lock();
    let (bin, _) = fixture();
    let (report, text, folded, summary, truth, pprof) =
        record_wrappers(bin, "sites-wrapper", &["--wrapper", "pool_take"]);
    let got = by_leaf(&report);
    for (site, want) in &truth {
        assert_eq!(got.get(site), Some(want), "{site}: {got:#?}\n{folded}");
    }
    for wrapper in ["xmalloc", "my_alloc", "pool_take", "operator new", "strdup"] {
        assert!(
            !got.keys().any(|k| k.starts_with(wrapper)),
            "{wrapper} named as a site: {got:#?}"
        );
        assert!(
            !summary
                .lines()
                .any(|l| l.contains(" allocations  ") && l.contains(wrapper)),
            "{wrapper} in the summary: {summary}"
        );
    }
    // The wrappers are kept, outermost first, beside the stack they served.
    let via = |site: &str| -> Vec<String> {
        let s = report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| {
                s["frames"].as_array().unwrap().last().unwrap()["function"]
                    .as_str()
                    .is_some_and(|f| f.starts_with(site))
            })
            .unwrap_or_else(|| panic!("no stack of {site}"));
        s["wrappers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| bare(f["function"].as_str().unwrap()).to_string())
            .collect()
    };
    assert_eq!(via("load_config"), ["xmalloc"]);
    assert_eq!(via("parse_body"), ["my_alloc"]);
    assert_eq!(via("session_join"), ["pool_take"]);
    assert!(via("make_buffer")[0].starts_with("operator new"));
    assert_eq!(via("keep_name"), ["strdup"]);
    assert_eq!(report["meta"]["wrappers"]["detected"][0], "my_alloc");
    // The start line is one readable line; the entry points probed are in the JSON report.
    let start = summary.lines().next().unwrap();
    assert!(
        start.len() < 240 && start.contains(" entry points"),
        "{start}"
    );
    let probed = report["meta"]["entry_points"][0].as_str().unwrap();
    assert!(
        probed.contains("malloc") && probed.contains("free"),
        "{probed}"
    );
    // Identical stacks are one, in the text report as in the folded one.
    let rows = text
        .lines()
        .filter(|l| l.trim_start().starts_with("make_buffer"))
        .count();
    assert_eq!(rows, 1, "{text}");
    assert_eq!(
        folded.lines().filter(|l| l.contains("make_buffer")).count(),
        1
    );
    // pprof keeps the wrappers and drops them by the same rule.
    let top = pprof_top(&pprof, &["-nodecount=100", "-nodefraction=0"]);
    for (site, (bytes, _)) in &truth {
        assert!(
            top.lines()
                .any(|l| l.trim_start().starts_with(&format!("{bytes}B")) && l.contains(site)),
            "{site} {bytes}B not flat in go tool pprof:\n{top}"
        );
    }
    assert!(
        !top.contains("xmalloc") && !top.contains("pool_take"),
        "{top}"
    );
}

/// Without `--wrapper`, the pool's two callers are one site: the pool (the flag is what
/// told them apart above).
#[test]
fn wrapper_flag_names_a_programs_own_wrapper() {
    let _g = lock();
    let (bin, _) = fixture();
    let (report, ..) = record_wrappers(bin, "sites-nowrapper", &[]);
    let got = by_leaf(&report);
    assert_eq!(got.get("pool_take"), Some(&(1100, 2)), "{got:#?}");
    assert!(!got.contains_key("session_open"), "{got:#?}");
}

/// glibc's frames are named by their public names (valgrind's): `strdup`,
/// `_IO_file_doallocate`, `puts`, never a `__GI_` alias.
#[test]
fn glibc_frames_have_public_names() {
    let _g = lock();
    let (bin, _) = fixture();
    let (report, _, folded, ..) = record_wrappers(bin, "sites-names", &[]);
    let names = all_names(&report);
    let internal: Vec<&String> = names.iter().filter(|n| n.starts_with("__GI_")).collect();
    assert!(internal.is_empty(), "{internal:?}\n{folded}");
    assert!(
        folded.contains(";puts;") && folded.contains(";_IO_file_doallocate "),
        "{folded}"
    );
    assert!(names.iter().any(|n| n == "strdup"), "{names:?}");
}

/// A stripped binary: its frames cannot be named, but each keeps its module and offset, so
/// its functions stay apart in the folded output (and the SVG drawn from it).
#[test]
fn unnamed_frames_keep_module_and_offset() {
    let _g = lock();
    let (_, stripped) = fixture();
    let (report, _, folded, _, truth, _) = record_wrappers(stripped, "sites-stripped", &[]);
    assert!(!folded.contains("[unknown]"), "{folded}");
    let leaves: std::collections::BTreeSet<&str> = folded
        .lines()
        .filter_map(|l| l.rsplit_once(' ')?.0.rsplit(';').next())
        .filter(|leaf| leaf.starts_with("wrappers-stripped+0x"))
        .collect();
    // Every site of the truth but keep_name (its leaf is libc's strdup) is a leaf of its own,
    // less those behind the pool, which is not known here.
    assert!(leaves.len() >= truth.len() - 3, "{leaves:?}\n{folded}");
    let total: u64 = truth.values().map(|(b, _)| b).sum();
    let held: u64 = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["frames"].as_array().unwrap().iter().any(|f| {
                f["module"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("wrappers-stripped"))
            })
        })
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert!(held >= total, "{held} < {total}\n{folded}");
}

/// `top` names the same sites: past xmalloc, operator new[], the detected my_alloc and
/// `--wrapper pool_take`; and as `top --pid` attaches to a running process, no stack is cut
/// short at a wrapper for want of its unwind tables.
#[test]
fn top_names_sites_past_wrappers() {
    let _g = lock();
    let (bin, _) = fixture();
    let service = start_serving(bin);
    let pid = service.0.id().to_string();
    let output = Command::new(BIN)
        .args([
            "top",
            "--pid",
            &pid,
            "--interval",
            "1s",
            "--duration",
            "4s",
            "--rows",
            "30",
            "--wrapper",
            "pool_take",
        ])
        .output()
        .unwrap();
    assert_ok(&output);
    let text = String::from_utf8_lossy(&output.stdout);
    // One view per window, the one --duration ends included.
    let views: Vec<&str> = text.split("bridge-trace top: ").skip(1).collect();
    assert_eq!(views.len(), 4, "{text}");
    let last = views.last().unwrap();
    assert!(last.contains("window 4"), "{last}");
    for site in [
        "load_config()",
        "session_open()",
        "session_join()",
        "make_buffer(",
        "parse_header()",
        "parse_body()",
    ] {
        assert!(last.contains(site), "{site} not in\n{last}");
    }
    for wrapper in ["xmalloc", "pool_take", "operator new", "my_alloc"] {
        assert!(!last.contains(wrapper), "{wrapper} in\n{last}");
    }
}

/// `record --pid` loads the unwind tables before its probes: from the first allocation on,
/// every stack reaches its site (none cut at a wrapper), and no block is older than the
/// recording.
#[test]
fn record_pid_walks_every_stack_from_the_start() {
    let _g = lock();
    let (bin, _) = fixture();
    let service = start_serving(bin);
    let dir = scratch("sites-pid");
    let out_json = dir.join("r.json");
    let pid = service.0.id().to_string();
    let out = record(&[
        "--pid",
        &pid,
        "--duration",
        "1s",
        "--no-raw",
        "--wrapper",
        "pool_take",
        "-o",
        out_json.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let report = json(&out_json);
    let got = by_leaf(&report);
    let sites = [
        "load_config",
        "parse_header",
        "parse_body",
        "session_open",
        "session_join",
        "make_buffer",
    ];
    assert!(
        got.keys().all(|k| sites.contains(&k.as_str())),
        "a stack cut short: {got:#?}"
    );
    let duration = report["meta"]["duration_secs"].as_f64().unwrap();
    for s in report["stacks"].as_array().unwrap() {
        let age = s["oldest_age_secs"].as_f64().unwrap();
        assert!(age <= duration + 0.05, "oldest {age}s in {duration}s: {s}");
    }
}
