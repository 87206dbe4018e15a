//! `cargo xtask bench`, second part: what each `watch` tier costs the traced program, measured
//! in the same run as the untraced program, interleaved round after round:
//! - the bundled data bridge at a realistic rate (about 100k allocations a second), as the CPU
//!   time the service itself spends (from /proc/PID/stat) over a fixed stretch of wall time;
//! - the allocation-heavy loop (`bench/alloc-loop.c`), as nanoseconds per malloc+free pair.
//!
//! Every tier runs with `--max-overhead off --fixed-tier`, so that what is measured is the tier
//! itself, not the governor stepping up or down. Results go to `target/bench/watch.json`.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use crate::bench::Killed;

/// (name, tier): None is untraced.
const CONFIGS: [(&str, Option<&str>); 4] = [
    ("untraced", None),
    ("watch --tier growth", Some("growth")),
    ("watch --tier sampled", Some("sampled")),
    ("watch --tier full", Some("full")),
];

/// Messages a second of the data bridge: about 9 allocations each.
const DEMO_RATE: u32 = 11_000;

/// The slowdown goals of the tiers at the realistic rate, in percent of the untraced CPU time.
const GOALS: [(&str, f64); 2] = [("growth", 1.0), ("sampled", 5.0)];

/// User and system CPU seconds of `pid` so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').context("bad /proc/PID/stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn watch(tracer: &Path, pid: u32, tier: &str) -> Result<Killed> {
    Ok(Killed(
        Command::new(tracer)
            .args(["watch", "--pid", &pid.to_string(), "--tier", tier])
            .args(["--max-overhead", "off", "--fixed-tier", "--interval", "1s"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stderr(Stdio::null())
            .spawn()
            .context("starting watch")?,
    ))
}

/// CPU of the data bridge over `secs`, in CPUs, with `tier` watching it.
fn demo_cpu(tracer: &Path, demo: &Path, tier: Option<&str>, secs: f64) -> Result<f64> {
    let service = Killed(
        Command::new(demo)
            .args(["--rate", &DEMO_RATE.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the data bridge")?,
    );
    let pid = service.0.id();
    let _watch = match tier {
        Some(t) => Some(watch(tracer, pid, t)?),
        None => None,
    };
    // Attach, probe calibration and unwind tables first.
    std::thread::sleep(Duration::from_millis(2500));
    let (c0, t0) = (cpu_seconds(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (c1, t1) = (cpu_seconds(pid)?, Instant::now());
    Ok((c1 - c0) / t1.duration_since(t0).as_secs_f64())
}

/// Nanoseconds per pair of the loop with `tier` watching it.
fn loop_ns(tracer: &Path, workload: &Path, tier: Option<&str>, iterations: u64) -> Result<f64> {
    let child = Command::new(workload)
        .args([&iterations.to_string(), "10", "2000"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting alloc-loop")?;
    let _watch = match tier {
        Some(t) => Some(watch(tracer, child.id(), t)?),
        None => None,
    };
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("alloc-loop printed {text:?}"))
}

pub fn tiers(tracer: &Path, dir: &Path, short: bool) -> Result<Value> {
    let demo = crate::bench::build_demo(dir)?;
    let workload = dir.join("alloc-loop");
    let (rounds, secs, iterations) = if short {
        (1, 2.0, 20_000)
    } else {
        (3, 10.0, 200_000)
    };
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        eprintln!("bench: watch tiers, round {} of {rounds}", round + 1);
        for (i, (_, tier)) in CONFIGS.iter().enumerate() {
            cpu[i].push(demo_cpu(tracer, &demo, *tier, secs)?);
            ns[i].push(loop_ns(tracer, &workload, *tier, iterations)?);
        }
    }
    let median = |v: &[f64]| crate::bench::median(v.iter().copied());
    let (base_cpu, base_ns) = (median(&cpu[0]), median(&ns[0]));
    println!();
    println!(
        "watch tiers: the data bridge at {DEMO_RATE} messages/s (about {}k allocations/s), \
         its own CPU over {secs:.0} s; alloc-loop, {iterations} pairs; median of {rounds}",
        DEMO_RATE * 9 / 1000
    );
    println!(
        "{:<22} {:>12} {:>12} {:>16} {:>14} {:>12}",
        "configuration",
        "demo CPU %",
        "slowdown %",
        "extra CPU % of 1",
        "loop ns/pair",
        "x untraced"
    );
    let mut results = Vec::new();
    let mut missed = Vec::new();
    for (i, (name, tier)) in CONFIGS.iter().enumerate() {
        let (c, n) = (median(&cpu[i]), median(&ns[i]));
        let slowdown = (c - base_cpu) / base_cpu * 100.0;
        println!(
            "{name:<22} {:>12.2} {:>12.1} {:>16.2} {:>14.0} {:>11.1}x",
            c * 100.0,
            slowdown,
            (c - base_cpu) * 100.0,
            n,
            n / base_ns
        );
        if let Some((_, goal)) = GOALS.iter().find(|(t, _)| Some(*t) == *tier) {
            if slowdown > *goal {
                missed.push(format!(
                    "{name}: {slowdown:.1}% slower (goal: under {goal}%)"
                ));
            }
        }
        results.push(json!({
            "configuration": name,
            "demo_cpu": cpu[i],
            "median_demo_cpu": c,
            "demo_slowdown_percent": slowdown,
            "loop_ns_per_pair": ns[i],
            "median_loop_ns_per_pair": n,
            "loop_ratio_to_untraced": n / base_ns,
        }));
    }
    for m in &missed {
        println!("  ABOVE GOAL: {m}");
    }
    Ok(json!({
        "demo": {"program": "demo/data-bridge.c", "rate": DEMO_RATE, "seconds": secs},
        "loop": {"program": "bench/alloc-loop.c", "iterations": iterations, "depth": 10},
        "rounds": rounds,
        "goals_slowdown_percent": GOALS.iter().map(|(t, g)| json!({"tier": t, "goal": g})).collect::<Vec<_>>(),
        "results": results,
        "missed": missed,
    }))
}
