//! Golden files for the renderers: a fixed report rendered in every format must match
//! `tests/data/report.*` byte for byte. After an intended change, re-bless them with
//! `BLESS=1 cargo xtask test -- --test golden` and review the diff.
use std::path::{Path, PathBuf};

mod common;

use bridge_trace::{
    aggregate::{
        aggregate, report_of, PeakReport, Report, SeriesReport, StackReport, TimelineReport, View,
    },
    capture::{Capture, CapturedPeak, CapturedSeries, CapturedStack, CapturedTimeline, Location},
    model::{
        counters::Counters,
        maps::{Mapping, Module},
        meta::{Meta, UnwindSummary, REPORT_VERSION},
        timeline::{Event, Point},
    },
    render::{render_to_vec, Format, RenderOptions},
    symbolize::{Frame, Symbolize},
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
    // Inlined at route_table::insert's call (so at its return address too).
    let mut inlined = frame(
        "std::vec::Vec<T>::push",
        exe,
        0x1e00,
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
            wrappers: vec![frame("xmalloc", exe, 0x1101, "demo/xalloc.c", 9)],
            lifetimes: None,
            class: None,
            runtime: None,
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
            wrappers: Vec::new(),
            lifetimes: None,
            class: None,
            runtime: None,
        },
        StackReport {
            bytes: 24,
            count: 1,
            oldest_age_secs: 0.25,
            frames: vec![Frame::unknown(Some(exe.into()), Some(0x4242))],
            truncated: false,
            partial: true,
            wrappers: Vec::new(),
            lifetimes: None,
            class: None,
            runtime: None,
        },
    ];
    // What was allocated while traced: the leak site, a churning one that holds nothing,
    // and the route table.
    let allocated = vec![
        StackReport {
            bytes: 96_000_000,
            count: 240_000,
            oldest_age_secs: 0.0,
            frames: [
                root.clone(),
                vec![
                    frame("consumer", exe, 0x1aa1, "demo/data-bridge.c", 220),
                    frame("handle_message", exe, 0x1a31, "demo/data-bridge.c", 208),
                    frame("frame_build", exe, 0x1801, "demo/data-bridge.c", 122),
                ],
            ]
            .concat(),
            truncated: false,
            partial: false,
            wrappers: Vec::new(),
            lifetimes: None,
            class: None,
            runtime: None,
        },
        StackReport {
            oldest_age_secs: 0.0,
            ..stacks[0].clone()
        },
        StackReport {
            bytes: 8192,
            count: 4,
            oldest_age_secs: 0.0,
            ..stacks[1].clone()
        },
    ];
    let mut stacks = stacks;
    let mut allocated = allocated;
    for (s, class) in stacks.iter_mut().zip(["leaking", "cache", "undecided"]) {
        s.class = Some(class.into());
    }
    // Freed within 1 ms mostly (the churning frames), long-lived (the route table), none.
    let lifetimes = [
        vec![239_000, 900, 100, 0, 0, 0, 0, 0],
        vec![0, 0, 0, 0, 2, 0, 0, 0],
    ];
    for (s, l) in allocated.iter_mut().zip(lifetimes) {
        s.lifetimes = Some(l);
    }
    let timeline = fixed_timeline(&stacks);
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
                    ..Default::default()
                },
                Module {
                    path: libc.into(),
                    build_id: Some("a1ca6b0ec1ba4ec2b5b22a8a8e6d8c8b2e0f3d41".into()),
                    ..Default::default()
                },
            ],
            processes: Vec::new(),
            wrappers: Default::default(),
            entry_points: Vec::new(),
            verdicts: Vec::new(),
            injected: None,
            declared_suppressions: None,
        },
        stacks,
        allocated: Some(allocated),
        timeline: Some(timeline),
        suppressed: Vec::new(),
    }
}

/// The timeline of the fixed report: the leak growing, the route table filling then level,
/// the resident set beside them, the peak a moment before the end, one event.
fn fixed_timeline(stacks: &[StackReport]) -> TimelineReport {
    let n = 22;
    let at = |i: usize| i as f64 * 0.25;
    let leak: Vec<f64> = (0..n).map(|i| (844_651 * i / (n - 1)) as f64).collect();
    let routes: Vec<f64> = (0..n).map(|i| (204_800 * i.min(4) / 4) as f64).collect();
    let points = (0..n)
        .map(|i| Point {
            at_secs: at(i),
            rss_bytes: Some(2_000_000 + 60_000 * i as u64),
            bytes: leak[i] + routes[i] + if i == n - 2 { 60_000.0 } else { 24.0 },
            count: (400 * i / (n - 1) + 2) as f64,
        })
        .collect();
    let series = [leak, routes]
        .into_iter()
        .zip(stacks)
        .map(|(bytes, s)| SeriesReport {
            site: s.frames.last().unwrap().short_label(),
            frames: s.frames.clone(),
            bytes,
        })
        .collect();
    let held_then = |s: &StackReport, bytes: u64, count: u64| StackReport {
        bytes,
        count,
        oldest_age_secs: 0.0,
        class: None,
        ..s.clone()
    };
    TimelineReport {
        every_secs: 0.25,
        peak_every_secs: 0.25,
        points,
        series,
        events: vec![Event {
            at_secs: 5.25,
            what: "held at its exit".into(),
        }],
        peak: Some(PeakReport {
            at_secs: 5.0,
            bytes: 60_000 + 804_429 + 204_800,
            count: 483,
            stacks: vec![
                held_then(&stacks[0], 804_429, 381),
                held_then(&stacks[1], 204_800, 100),
            ],
        }),
    }
}

/// The capture the fixed report was made from: each stack's frames as (module, file offset),
/// the direct caller first, inlined frames sharing their caller's location.
/// The fixed report as version 1 knew it: no allocation wrappers kept apart, no allocation
/// profile.
fn fixed_report_v1() -> Report {
    let mut report = fixed_report();
    for s in &mut report.stacks {
        s.wrappers.clear();
    }
    report.allocated = None;
    report.timeline = None;
    for s in &mut report.stacks {
        s.class = None;
    }
    report
}

/// The capture `report` was made from.
fn capture_of(report: Report) -> Capture {
    let modules = report.meta.modules.clone();
    let captured = |stacks: &[StackReport]| -> Vec<CapturedStack> {
        stacks
            .iter()
            .map(|s| CapturedStack {
                frames: s
                    .frames
                    .iter()
                    .chain(&s.wrappers)
                    .rev()
                    .filter(|f| !f.inlined)
                    .map(|f| Location {
                        module: modules
                            .iter()
                            .position(|m| Some(&m.path) == f.module.as_ref())
                            .map(|i| i as u32),
                        offset: f.offset.unwrap(),
                    })
                    .collect(),
                truncated: s.truncated,
                partial: s.partial,
                bytes: s.bytes as f64,
                count: s.count as f64,
                oldest_age_secs: s.oldest_age_secs,
                process: None,
                mmap: false,
                lifetimes: s.lifetimes.clone(),
                class: s.class.clone(),
            })
            .collect()
    };
    let stacks = captured(&report.stacks);
    let allocated = report.allocated.as_deref().map(captured);
    // A series is drawn for the stack it names (the fixed timeline's are the report's first).
    let timeline = report.timeline.as_ref().map(|t| CapturedTimeline {
        every_secs: t.every_secs,
        peak_every_secs: t.peak_every_secs,
        points: t.points.clone(),
        series: captured(&report.stacks[..t.series.len()])
            .into_iter()
            .zip(&t.series)
            .map(|(mut stack, s)| {
                stack.class = None;
                stack.oldest_age_secs = 0.0;
                stack.bytes = s.bytes.iter().copied().fold(0.0, f64::max);
                stack.count = 0.0;
                CapturedSeries {
                    stack,
                    bytes: s.bytes.clone(),
                }
            })
            .collect(),
        events: t.events.clone(),
        peak: t.peak.as_ref().map(|p| CapturedPeak {
            at_secs: p.at_secs,
            bytes: p.bytes as f64,
            count: p.count as f64,
            stacks: captured(&p.stacks),
        }),
    });
    let mapping = |start: u64, path: &str| Mapping {
        start,
        end: start + 0x20_0000,
        offset: 0,
        executable: true,
        dev: "fe:01".into(),
        inode: start >> 12,
        path: path.into(),
    };
    Capture {
        meta: Meta {
            modules: Vec::new(),
            ..report.meta
        },
        mappings: modules
            .iter()
            .enumerate()
            .map(|(i, m)| mapping(0x5555_0000_0000 + ((i as u64) << 32), &m.path))
            .collect(),
        modules,
        stacks,
        processes: Vec::new(),
        allocated,
        timeline,
    }
}

/// Names locations as the fixed report has them, as if the binaries were here.
struct AsInTheReport(Report);

impl Symbolize for AsInTheReport {
    fn symbolize(&mut self, module: &Module, offsets: &[u64]) -> Vec<Vec<Frame>> {
        offsets
            .iter()
            .map(|&off| {
                let frames = self
                    .0
                    .stacks
                    .iter()
                    .chain(self.0.allocated.iter().flatten())
                    .flat_map(|s| s.frames.iter().chain(&s.wrappers));
                let mut group: Vec<Frame> = Vec::new();
                for f in frames {
                    let here = f.module.as_deref() == Some(&module.path) && f.offset == Some(off);
                    if here && (!f.inlined || !group.is_empty()) {
                        if !f.inlined && !group.is_empty() {
                            break;
                        }
                        group.push(f.clone());
                    }
                }
                group
            })
            .collect()
    }
}

/// Format version 1, as written then (`capture-v1.btcap` is written once and never re-blessed:
/// every later bridge-trace must still read it), decodes to the same capture, and
/// aggregates to the fixed report.
#[test]
fn capture_v1_still_loads() {
    let path = data_dir().join("capture-v1.btcap");
    if std::env::var_os("BLESS").is_some() && !path.exists() {
        std::fs::write(&path, capture_of(fixed_report_v1()).to_bytes().unwrap()).unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        &bytes[8..12],
        &1u32.to_le_bytes(),
        "not a version-1 capture"
    );
    let capture = Capture::from_bytes(&bytes).unwrap();
    assert_eq!(capture, capture_of(fixed_report_v1()));
    assert_eq!(
        aggregate(&capture, &mut AsInTheReport(fixed_report_v1())),
        fixed_report_v1()
    );
    // Here, without /srv/data-bridge and that libc build, every frame stays unnamed, each
    // module with the reason; the stacks keep their bytes.
    let rendered = report_of(&capture, &[], None);
    check(
        &render_to_vec(&rendered.report, Format::Folded, RenderOptions::default()).unwrap(),
        "capture-v1.folded",
    );
    let unnamed: Vec<&str> = rendered.unnamed.iter().map(|u| u.0.as_str()).collect();
    assert_eq!(
        unnamed,
        ["/srv/data-bridge", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
    );
    assert!(rendered.unnamed.iter().all(|u| u.2.contains("--debug-dir")));
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn check_format(format: Format, name: &str) {
    let got = render_to_vec(&fixed_report(), format, RenderOptions::default()).unwrap();
    check(&got, name);
}

fn check(got: &[u8], name: &str) {
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
    use bridge_trace::cmd::diff;
    let before = diff::load(&data_dir().join("diff-before.folded")).unwrap();
    let after = diff::load(&data_dir().join("report.folded")).unwrap();
    let svg = diff::svg(&before, &after, "bridge-trace diff: before → after").unwrap();
    check(&svg, "diff.svg");
    let mut folded = diff::differential_lines(&before, &after).join("\n");
    folded.push('\n');
    check(folded.as_bytes(), "diff.folded");
    check(
        diff::table(&diff::sites(&before, &after), 10).as_bytes(),
        "diff.txt",
    );
    // The JSON report gives the same stacks as its folded rendering.
    assert_eq!(diff::load(&data_dir().join("report.json")).unwrap(), after);
}

#[test]
fn folded() {
    check_format(Format::Folded, "report.folded");
}

#[test]
fn svg() {
    check_format(Format::Svg, "report.svg");
}

#[test]
fn json() {
    check_format(Format::Json, "report.json");
}

#[test]
fn text() {
    check_format(Format::Text, "report.txt");
}

#[test]
fn html() {
    check_format(Format::Html, "report.html");
}

/// `--view alloc`: the flamegraph and folded stacks of what was allocated, freed or not.
#[test]
fn alloc_view() {
    let alloc = RenderOptions {
        view: View::Alloc,
        ..RenderOptions::default()
    };
    for (format, name) in [
        (Format::Folded, "report-alloc.folded"),
        (Format::Svg, "report-alloc.svg"),
    ] {
        check(
            &render_to_vec(&fixed_report(), format, alloc).unwrap(),
            name,
        );
    }
    // A report without the profile (an older capture) says so instead.
    let err = render_to_vec(&fixed_report_v1(), Format::Svg, alloc).unwrap_err();
    assert!(err.to_string().contains("no allocation profile"), "{err}");
}

/// `--view peak`: what was held at the timeline's peak, in the flamegraph, the folded stacks
/// and pprof; a report from an older capture says it has none.
#[test]
fn peak_view() {
    let peak = RenderOptions {
        view: View::Peak,
        ..RenderOptions::default()
    };
    check(
        &render_to_vec(&fixed_report(), Format::Folded, peak).unwrap(),
        "report-peak.folded",
    );
    let folded = std::fs::read_to_string(data_dir().join("report-peak.folded")).unwrap();
    let total: u64 = folded
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    let want = fixed_report().timeline.unwrap().peak.unwrap();
    assert_eq!(total, want.stacks.iter().map(|s| s.bytes).sum::<u64>());
    assert!(render_to_vec(&fixed_report(), Format::Pprof, peak).is_ok());
    let err = render_to_vec(&fixed_report_v1(), Format::Svg, peak).unwrap_err();
    assert!(err.to_string().contains("no peak"), "{err}");
}

/// The capture of the fixed report round-trips through the current format, its allocation
/// profile included, and aggregates back to the report.
#[test]
fn capture_round_trips_with_the_allocation_profile() {
    let capture = capture_of(fixed_report());
    let back = Capture::from_bytes(&capture.to_bytes().unwrap()).unwrap();
    assert_eq!(back, capture);
    assert_eq!(
        aggregate(&back, &mut AsInTheReport(fixed_report())),
        fixed_report()
    );
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
    check_format(Format::Pprof, "report.pb.gz");
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
    // And the allocation profile, by its own sample type.
    let alloc = common::pprof_top(&path, &["-sample_index=alloc_space", "-nodefraction=0"]);
    let allocated: u64 = report.allocated.iter().flatten().map(|s| s.bytes).sum();
    assert!(
        alloc.contains(&format!("{allocated}B total")),
        "allocated {allocated}: {alloc}"
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
