//! Golden files for the renderers: a fixed report rendered in every format must match
//! `tests/data/report.*` byte for byte. After an intended change, re-bless them with
//! `BLESS=1 cargo xtask test -- --test golden` and review the diff.
use std::path::{Path, PathBuf};

mod common;

use bridge_trace::{
    aggregate::{Meta, Report, StackReport, REPORT_VERSION},
    capture::Module,
    cli::Format,
    collect::Counters,
    report::{render_to_vec, RenderOptions},
    symbolize::Frame,
    unwind::UnwindSummary,
};

fn frame(function: &str, module: &str, offset: u64, file: &str, line: u32) -> Frame {
    Frame {
        function: Some(function.into()),
        module: Some(module.into()),
        offset: Some(offset),
        file: Some(file.into()),
        line: Some(line),
        inlined: false,
    }
}

/// A report as the data-bridge demo produces it, with every kind of frame.
fn fixed_report() -> Report {
    let exe = "/srv/data-bridge";
    let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let root = vec![
        frame(
            "__clone3",
            libc,
            0x1277f0,
            "../sysdeps/unix/sysv/linux/x86_64/clone3.S",
            81,
        ),
        frame(
            "start_thread",
            libc,
            0x8a3b1,
            "./nptl/pthread_create.c",
            444,
        ),
    ];
    let mut inlined = frame(
        "std::vec::Vec<T>::push",
        exe,
        0x1f20,
        "alloc/src/vec/mod.rs",
        1825,
    );
    inlined.inlined = true;
    let stacks = vec![
        StackReport {
            bytes: 844_651,
            count: 400,
            oldest_age_secs: 4.5,
            frames: [
                root.clone(),
                vec![
                    frame("consumer", exe, 0x1aa1, "demo/data-bridge.c", 220),
                    frame("handle_message", exe, 0x1a31, "demo/data-bridge.c", 208),
                    frame("reject_message", exe, 0x1981, "demo/data-bridge.c", 193),
                ],
            ]
            .concat(),
            truncated: false,
            partial: false,
        },
        StackReport {
            bytes: 4096,
            count: 2,
            oldest_age_secs: 5.0,
            frames: [
                root.clone(),
                vec![
                    frame("producer", exe, 0x1c00, "demo/data-bridge.c", 231),
                    frame("route_table::insert", exe, 0x1e00, "demo/routes.rs", 12),
                    inlined,
                ],
            ]
            .concat(),
            truncated: true,
            partial: false,
        },
        StackReport {
            bytes: 24,
            count: 1,
            oldest_age_secs: 0.25,
            frames: vec![Frame::unknown(Some(exe.into()), Some(0x4242))],
            truncated: false,
            partial: true,
        },
    ];
    Report {
        meta: Meta {
            version: REPORT_VERSION,
            target: "data-bridge --messages 20000".into(),
            pid: 4242,
            duration_secs: 5.25,
            target_exited: true,
            min_age_secs: None,
            allocator: libc.into(),
            counters: Counters {
                allocs: 241_888,
                frees: 241_486,
                unknown_frees: 7,
                stack_failures: 1,
                exit_stops: 1,
                start_stops: 1,
                unwind_no_table: 3,
                ..Counters::default()
            },
            younger_than_min_age: 0,
            unwind: Some(UnwindSummary {
                mode: "auto".into(),
                objects: 4,
                rows: 41_207,
                build_ms: 12.5,
                slowest: Some((libc.into(), 6.25)),
                missing: vec![(
                    "/opt/vendor/libblob.so".into(),
                    "no call-frame information".into(),
                )],
            }),
            programs: Vec::new(),
            sample_interval: None,
            exe: Some(exe.into()),
            host: Some("web-3".into()),
            kernel: Some("6.18.0-1-amd64".into()),
            started: Some("2026-11-26T07:00:00Z".into()),
            tier: Some("full".into()),
            modules: vec![
                Module {
                    path: exe.into(),
                    build_id: Some("5be1c9d2a0e3f4b5c6d7e8f90a1b2c3d4e5f6071".into()),
                },
                Module {
                    path: libc.into(),
                    build_id: Some("a1ca6b0ec1ba4ec2b5b22a8a8e6d8c8b2e0f3d41".into()),
                },
            ],
        },
        stacks,
    }
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn check(format: Format, name: &str) {
    let got = render_to_vec(&fixed_report(), format, RenderOptions::default()).unwrap();
    check_bytes(&got, name);
}

fn check_bytes(got: &[u8], name: &str) {
    let path = data_dir().join(name);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (BLESS=1 creates it)", path.display()));
    if got != want {
        let fresh = path.with_extension("new");
        std::fs::write(&fresh, got).unwrap();
        panic!(
            "{} differs from the golden file; the new output is in {}",
            name,
            fresh.display()
        );
    }
}

/// `bridge-trace diff`: an earlier report (`diff-before.folded`: the reject site a quarter of
/// its size, the [unknown] stack not there yet, a session-cache stack since gone) against the
/// golden report's folded stacks.
#[test]
fn diff() {
    use bridge_trace::diff;
    let before = diff::load(&data_dir().join("diff-before.folded")).unwrap();
    let after = diff::load(&data_dir().join("report.folded")).unwrap();
    let svg = diff::svg(&before, &after, "bridge-trace diff: before → after").unwrap();
    check_bytes(&svg, "diff.svg");
    let mut folded = diff::differential_lines(&before, &after).join("\n");
    folded.push('\n');
    check_bytes(folded.as_bytes(), "diff.folded");
    check_bytes(
        diff::table(&diff::sites(&before, &after), 10).as_bytes(),
        "diff.txt",
    );
    // The JSON report gives the same stacks as its folded rendering.
    assert_eq!(diff::load(&data_dir().join("report.json")).unwrap(), after);
}

#[test]
fn folded() {
    check(Format::Folded, "report.folded");
}

#[test]
fn svg() {
    check(Format::Svg, "report.svg");
}

#[test]
fn json() {
    check(Format::Json, "report.json");
}

#[test]
fn text() {
    check(Format::Text, "report.txt");
}

#[test]
fn html() {
    check(Format::Html, "report.html");
}

#[test]
fn json_round_trips() {
    let r = fixed_report();
    let bytes = render_to_vec(&r, Format::Json, RenderOptions::default()).unwrap();
    let back: Report = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(back, r);
}

#[test]
fn pprof() {
    check(Format::Pprof, "report.pb.gz");
}

/// `go tool pprof` (Debian's golang-go) reads the profile and agrees with the text report:
/// the same total and, per leaf function, the same bytes.
#[test]
fn go_tool_pprof_agrees_with_the_text_report() {
    let report = fixed_report();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leaks.pb.gz");
    std::fs::write(
        &path,
        render_to_vec(&report, Format::Pprof, RenderOptions::default()).unwrap(),
    )
    .unwrap();
    let text = common::pprof_top(&path, &["-nodecount=50", "-nodefraction=0"]);
    let total = report.total_bytes();
    assert!(
        text.contains(&format!("{total}B total")),
        "total {total}: {text}"
    );
    // Flat bytes per leaf function, as pprof's table has them.
    let mut by_leaf: std::collections::BTreeMap<String, u64> = Default::default();
    for s in &report.stacks {
        let leaf = s.frames.last().unwrap().display_name().to_string();
        *by_leaf.entry(leaf).or_default() += s.bytes;
    }
    // pprof shows names without template arguments, inlined ones marked "(inline)".
    let simple = |name: &str| {
        let mut depth = 0;
        name.chars()
            .filter(|&c| {
                match c {
                    '<' => depth += 1,
                    '>' => depth -= 1,
                    _ => return depth == 0,
                }
                false
            })
            .collect::<String>()
    };
    for (leaf, bytes) in by_leaf {
        let leaf = simple(&leaf);
        let row = text
            .lines()
            .find(|l| l.trim_end().trim_end_matches(" (inline)").ends_with(&leaf))
            .unwrap_or_else(|| panic!("{leaf} missing: {text}"));
        assert!(
            row.trim_start().starts_with(&format!("{bytes}B")),
            "{leaf}: {row}"
        );
    }
}
