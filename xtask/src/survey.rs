//! `cargo xtask bench`, fourth part: every allocator bridge-trace supports (glibc, jemalloc,
//! mimalloc, tcmalloc, each also behind its C++ operators), probed as `record` places the
//! probes in it: the allocation loop (`bench/alloc-loop.c`) linked with each, untraced and
//! under `record`, as nanoseconds per malloc+free pair, with where each probe went and which
//! entry points the kernel single-steps; and how long the probes take to detach, as
//! multi-uprobe links and as perf-event uprobes (`BRIDGE_TRACE_PERF_UPROBES=1`). Results go to
//! `target/bench/allocators.json`.
use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use crate::{
    bench::{first_number, median},
    run,
};

/// Each allocator, and how the loop links with it.
const ALLOCATORS: &[(&str, &[&str])] = &[
    ("glibc", &[]),
    ("jemalloc", &["-ljemalloc"]),
    ("mimalloc", &["-lmimalloc"]),
    ("tcmalloc", &["-ltcmalloc"]),
];

pub fn survey(tracer: &Path, dir: &Path, short: bool) -> Result<Value> {
    let (iterations, rounds) = if short { (20_000u64, 1) } else { (200_000, 3) };
    let src = crate::root().join("bench/alloc-loop.c");
    println!();
    println!("allocators, probed as placed: {iterations} malloc+free pairs, median of {rounds}");
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>12} {:>12}  single-stepped",
        "allocator", "untraced", "traced", "µs per pair", "detach multi", "detach perf"
    );
    let mut rows = Vec::new();
    for (name, libs) in ALLOCATORS {
        let program = dir.join(format!("alloc-loop-{name}"));
        run(Command::new("gcc")
            .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&program)
            .arg(&src)
            .args(*libs))?;
        let args = [iterations.to_string(), "10".to_string()];
        let mut untraced = Vec::new();
        let mut traced = Vec::new();
        let mut detach = Vec::new();
        let mut detach_perf = Vec::new();
        let mut last = Value::Null;
        for _ in 0..rounds {
            let out = crate::output(Command::new(&program).args(&args))?;
            untraced.push(first_number(&out)?);
            let (ns, ms, report) = traced_run(tracer, dir, &program, &args, false)?;
            traced.push(ns);
            detach.push(ms);
            last = report;
            detach_perf.push(traced_run(tracer, dir, &program, &args, true)?.1);
        }
        let (u, t) = (median(untraced.into_iter()), median(traced.into_iter()));
        let (d, dp) = (median(detach.into_iter()), median(detach_perf.into_iter()));
        let entry_points = last["meta"]["entry_points"].clone();
        let stepped = last["single_stepped"].clone();
        println!(
            "{name:<10} {u:>8.0}ns {t:>8.0}ns {:>12.2} {:>10.0}ms {:>10.0}ms  {}",
            (t - u) / 1000.0,
            d,
            dp,
            stepped
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
        rows.push(json!({
            "allocator": name,
            "untraced_ns_per_pair": u,
            "traced_ns_per_pair": t,
            "probe_us_per_pair": (t - u) / 1000.0,
            "detach_ms_multi_links": d,
            "detach_ms_perf_uprobes": dp,
            "entry_points": entry_points,
            "single_stepped": stepped,
        }));
    }
    Ok(json!({"iterations": iterations, "rounds": rounds, "allocators": rows}))
}

/// One `record` of `program`: its ns per pair, the probes' detach time in ms (from
/// bridge-trace's own log line), and the JSON report.
fn traced_run(
    tracer: &Path,
    dir: &Path,
    program: &Path,
    args: &[String],
    perf: bool,
) -> Result<(f64, f64, Value)> {
    let report = dir.join("survey.json");
    let out = Command::new(tracer)
        .args(["record", "--quiet", "--no-raw", "-o"])
        .arg(&report)
        .arg("--")
        .arg(program)
        .args(args)
        .env("BRIDGE_TRACE_LOG", "bridge_trace::attach=info")
        .env("BRIDGE_TRACE_PERF_UPROBES", if perf { "1" } else { "0" })
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "record {}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ms = stderr
        .lines()
        .filter(|l| l.contains("detached"))
        .find_map(|l| l.split("ms=").nth(1)?.trim().parse::<f64>().ok())
        .context("no detach time in bridge-trace's log")?;
    let mut report: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    // What the start line says the kernel single-steps: `(free, realloc single-stepped: …)`.
    let start = stderr.lines().find(|l| l.contains("tracing")).unwrap_or("");
    let stepped: Vec<String> = start
        .split(" single-stepped")
        .filter_map(|before| Some(before.rsplit_once('(')?.1.to_string()))
        .filter(|names| !names.contains(')'))
        .collect();
    report["single_stepped"] = json!(stepped);
    Ok((first_number(&stdout)?, ms, report))
}
