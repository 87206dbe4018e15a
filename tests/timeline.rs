//! What `record` says about memory over time, against a program that knows its own
//! (tests/fixtures/timeline.c): the timeline's series of the site that peaks holds exactly
//! its peak, then exactly its plateau, then nothing; the peak is found, with that site's
//! bytes exact, and `--view peak` draws it; each site's allocation totals are exact; the
//! lifetimes tell temporary blocks from long-lived ones; the classes tell the leak from the
//! cache; and an older capture still reports, its timeline said to be absent.
use std::{collections::BTreeMap, path::Path};

use serde_json::Value;

mod common;
use common::*;

/// The fixture's truth file: "name value" lines.
fn facts(path: &Path) -> BTreeMap<String, u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// What the entries of `list` (stacks with frames) whose leaf function is `leaf` add up to:
/// the fixture calls each site from several phases, one stack each.
#[derive(Debug, Default)]
struct Leaf {
    bytes: u64,
    count: u64,
    lifetimes: Vec<u64>,
    classes: Vec<String>,
}

fn leaf_sum(list: &Value, leaf: &str) -> Leaf {
    let mut sum = Leaf::default();
    for s in list.as_array().unwrap() {
        if functions(s).last().map(|f| bare(f)) != Some(leaf) {
            continue;
        }
        sum.bytes += u(&s["bytes"]);
        sum.count += u(&s["count"]);
        if let Some(l) = s["lifetimes"].as_array() {
            sum.lifetimes.resize(l.len(), 0);
            for (a, b) in sum.lifetimes.iter_mut().zip(l) {
                *a += u(b);
            }
        }
        if let Some(c) = s["class"].as_str() {
            sum.classes.push(c.to_string());
        }
    }
    assert!(sum.count > 0, "no {leaf}: {list:#}");
    sum
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_f64().map(|f| f.round() as u64))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn timeline_peak_lifetimes_and_classes_match_the_program() {
    let _g = lock();
    let dir = scratch("timeline");
    let bin = dir.join("timeline");
    build_c(&bin, "tests/fixtures/timeline.c", &[]);
    let truth = dir.join("truth.txt");
    let json_path = dir.join("report.json");
    let text_path = dir.join("report.txt");
    let out = record(&[
        "-o",
        json_path.to_str().unwrap(),
        "-o",
        text_path.to_str().unwrap(),
        "--",
        bin.to_str().unwrap(),
        truth.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let facts = facts(&truth);
    let report = json(&json_path);
    let t = &report["timeline"];

    // The series of grow_block: exactly its peak for a while, then exactly its plateau, then
    // nothing (the points are at most 0.25 s apart; each phase lasts 1.5 s).
    let series = t["series"].as_array().unwrap();
    let grow = series
        .iter()
        .find(|s| s["site"].as_str().unwrap().starts_with("grow_block"))
        .unwrap_or_else(|| panic!("no grow_block series: {t:#}"));
    let values: Vec<u64> = grow["bytes"].as_array().unwrap().iter().map(u).collect();
    let points = t["points"].as_array().unwrap();
    assert_eq!(values.len(), points.len());
    let (peak, plateau) = (facts["peak"], facts["plateau"]);
    let at_peak: Vec<usize> = (0..values.len()).filter(|&i| values[i] == peak).collect();
    let at_plateau: Vec<usize> = (0..values.len())
        .filter(|&i| values[i] == plateau)
        .collect();
    assert!(at_peak.len() >= 3, "{values:?}");
    assert!(at_plateau.len() >= 3, "{values:?}");
    assert!(at_peak.last() < at_plateau.first(), "{values:?}");
    assert_eq!(values.iter().max(), Some(&peak), "{values:?}");
    assert_eq!(values.last(), Some(&0), "{values:?}");
    // Each point's total is at least what grow_block held then, and the resident set is read.
    for (p, v) in points.iter().zip(&values) {
        assert!(u(&p["bytes"]) >= *v, "{p}");
        assert!(p["rss_bytes"].as_u64().is_some(), "{p}");
    }

    // The peak: while grow_block held its peak, with its bytes exact.
    let pk = &t["peak"];
    let at = pk["at_secs"].as_f64().unwrap();
    let secs = |i: usize| points[i]["at_secs"].as_f64().unwrap();
    assert!(
        at >= secs(at_peak[0]) && at <= secs(*at_peak.last().unwrap()),
        "peak at {at}s, grow_block's peak from {}s to {}s",
        secs(at_peak[0]),
        secs(*at_peak.last().unwrap())
    );
    let held = leaf_sum(&pk["stacks"], "grow_block");
    assert_eq!((held.bytes, held.count), (peak, 512));
    let text = std::fs::read_to_string(&text_path).unwrap();
    assert!(text.contains("\npeak: "), "{text}");
    assert!(text.contains("held at its exit"), "{text}");

    // Allocation totals per site, exact; lifetimes: temporary ones under 10 ms (all but a
    // preempted few), long-lived ones never under 10 ms (they sleep 50 ms before the free).
    let allocated = &report["allocated"];
    let temp = leaf_sum(allocated, "temp_block");
    assert_eq!(temp.count, facts["temp"]);
    assert_eq!(temp.bytes, facts["temp"] * facts["temp_size"]);
    let l = &temp.lifetimes;
    assert_eq!(l.iter().sum::<u64>(), facts["temp"], "{l:?}");
    assert!(
        (l[0] + l[1]) * 1000 >= facts["temp"] * 995,
        "temporary: {l:?}"
    );
    let l = &leaf_sum(allocated, "long_block").lifetimes;
    assert_eq!(l.iter().sum::<u64>(), facts["long"], "{l:?}");
    assert_eq!(l[0] + l[1], 0, "none under 10 ms: {l:?}");
    assert!(l[2] * 10 >= facts["long"] * 9, "mostly 10-100 ms: {l:?}");
    assert!(
        text.contains("% temporary (within 10 ms)"),
        "no lifetimes in the text: {text}"
    );

    // What is held at the end: the leak, leaking; the cache, a cache; both exact.
    let stacks = &report["stacks"];
    let leak = leaf_sum(stacks, "leak_block");
    assert_eq!(leak.bytes, facts["leak"] * facts["leak_size"]);
    assert!(leak.classes.iter().all(|c| c == "leaking"), "{leak:?}");
    let cache = leaf_sum(stacks, "cache_block");
    assert_eq!(cache.bytes, facts["cache"] * facts["cache_size"]);
    assert_eq!(cache.classes, ["cache"], "{cache:?}");

    // `--view peak` from the capture: grow_block's line holds exactly the peak.
    let capture = json_path.with_extension("btcap");
    let folded = dir.join("peak.folded");
    let out = std::process::Command::new(BIN)
        .args(["report", "--view", "peak", "-o"])
        .arg(&folded)
        .arg(&capture)
        .output()
        .unwrap();
    assert_ok(&out);
    let folded = std::fs::read_to_string(&folded).unwrap();
    let line = folded
        .lines()
        .find(|l| l.rsplit_once(' ').unwrap().0.ends_with(";grow_block"))
        .unwrap_or_else(|| panic!("{folded}"));
    assert_eq!(line.rsplit_once(' ').unwrap().1, peak.to_string());
}

/// A capture written before the timeline (format version 1) still reports: the text says the
/// timeline is absent, and `--view peak` is refused with one line.
#[test]
fn an_older_capture_says_it_has_no_timeline() {
    let capture = repo().join("tests/data/capture-v1.btcap");
    let dir = scratch("timeline-v1");
    let text = dir.join("r.txt");
    let out = std::process::Command::new(BIN)
        .args(["report", "-o"])
        .arg(&text)
        .arg(&capture)
        .output()
        .unwrap();
    assert_ok(&out);
    let text = std::fs::read_to_string(&text).unwrap();
    assert!(
        text.contains("over time: no timeline in this capture"),
        "{text}"
    );
    let out = std::process::Command::new(BIN)
        .args(["report", "--view", "peak", "-o"])
        .arg(dir.join("p.svg"))
        .arg(&capture)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no peak"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!dir.join("p.svg").exists());
}
