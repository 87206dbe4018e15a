//! `--inject` in `cargo xtask bench`: how long an injection stops the demo at ~100k
//! allocations/s (a first load, and a second that finds the library loaded), and what exact
//! tracing costs a program through the injected sampler (`record --inject`, every allocation
//! reported) against plain `record` (uprobes on the allocator), on glibc and on jemalloc
//! (whose `free` entry the kernel single-steps).
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::bench::{median, Killed};

/// The stop must stay under this (the goal).
const STOP_GOAL_MS: f64 = 50.0;
/// The paced fixture's rate for the record comparison: malloc+free pairs a second.
const PAIRS_PER_SEC: u32 = 50_000;

/// `record --pid --inject` once: the stop it said, in milliseconds, and whether it loaded the
/// library (not found loaded).
fn injection(tracer: &Path, pid: u32, out: &Path) -> Result<(f64, bool)> {
    let o = Command::new(tracer)
        .args(["record", "--pid", &pid.to_string(), "--inject"])
        .args(["--inject-interval", "512KiB", "--duration", "1s", "-o"])
        .arg(out)
        .output()
        .context("running record --inject")?;
    let said = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        bail!("record --inject failed: {said}");
    }
    let line = said
        .lines()
        .find(|l| l.contains("injected the sampler"))
        .with_context(|| format!("no injection line in: {said}"))?;
    let ms: f64 = line
        .split("stopped ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no stop time in: {line}"))?;
    Ok((ms, !line.contains("(loaded before)")))
}

/// The stop times over `n` fresh data bridges at the tiers' rate: the first injection (the
/// library loaded) and a second (found loaded).
fn stop_times(tracer: &Path, demo: &Path, dir: &Path, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut first, mut again) = (Vec::new(), Vec::new());
    for i in 0..n {
        let service = Killed(
            Command::new(demo)
                .args(["--rate", &crate::tiers::DEMO_RATE.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the data bridge")?,
        );
        std::thread::sleep(Duration::from_secs(1));
        let pid = service.0.id();
        let (ms, loaded) = injection(tracer, pid, &dir.join(format!("inject-{i}.json")))?;
        if !loaded {
            bail!("a fresh data bridge had the library already");
        }
        first.push(ms);
        let (ms, loaded) = injection(tracer, pid, &dir.join(format!("inject-{i}b.json")))?;
        if loaded {
            bail!("the second injection loaded the library again");
        }
        again.push(ms);
    }
    Ok((first, again))
}

/// The paced fixture's CPU (a fraction of one) over `secs`, with `record` running as `args`
/// says (none: untraced).
fn paced_cpu(
    tracer: &Path,
    exe: &Path,
    record: Option<&[&str]>,
    out: &Path,
    secs: f64,
) -> Result<f64> {
    let mut child = Command::new(exe)
        .args(["pairs", &PAIRS_PER_SEC.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting paced")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("paced stdout")?).read_line(&mut line)?;
    let paced = Killed(child);
    let pid = paced.0.id();
    let _tracer = match record {
        Some(args) => {
            let mut t = Command::new(tracer)
                .args(["record", "--quiet", "--pid", &pid.to_string()])
                .args(args)
                .arg("-o")
                .arg(out)
                .arg("--no-raw")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting record")?;
            let mut said = String::new();
            BufReader::new(t.stderr.take().context("record stderr")?).read_line(&mut said)?;
            if !said.contains("tracing") {
                bail!("record did not start: {said}");
            }
            Some(Killed(t))
        }
        None => None,
    };
    std::thread::sleep(Duration::from_millis(500));
    let c0 = crate::tiers::cpu_seconds(pid)?;
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    Ok((crate::tiers::cpu_seconds(pid)? - c0) / t0.elapsed().as_secs_f64())
}

pub fn inject(tracer: &Path, dir: &Path, short: bool) -> Result<Value> {
    let demo = crate::bench::build_demo(dir)?;
    let (n, secs) = if short { (2, 2.0) } else { (5, 5.0) };
    let (first, again) = stop_times(tracer, &demo, dir, n)?;
    let worst = first.iter().chain(&again).copied().fold(0.0, f64::max);
    println!(
        "\ninjection into the data bridge at {} messages/s, {n} fresh processes: stopped {:.1} ms \
         (median) to load the sampler, {:.1} ms to find it loaded; worst {worst:.1} ms \
         (goal: under {STOP_GOAL_MS} ms){}",
        crate::tiers::DEMO_RATE,
        median(first.iter().copied()),
        median(again.iter().copied()),
        if worst < STOP_GOAL_MS {
            ""
        } else {
            "  ABOVE GOAL"
        }
    );
    let root = crate::root();
    let paced_src = root.join("tests/fixtures/paced.c");
    let mut rows = Vec::new();
    println!(
        "exact tracing, tests/fixtures/paced.c at {PAIRS_PER_SEC} malloc+free pairs/s, its \
         own CPU over {secs:.0} s (% of one):"
    );
    println!(
        "{:<10} {:>10} {:>16} {:>22}",
        "allocator", "untraced", "record (uprobes)", "record --inject (every)"
    );
    for (name, libs) in [("glibc", &[][..]), ("jemalloc", &["-ljemalloc"][..])] {
        let exe = dir.join(format!("paced-{name}"));
        let status = Command::new("gcc")
            .args(["-O2", "-g", "-o"])
            .arg(&exe)
            .arg(&paced_src)
            .args(libs)
            .status()?;
        if !status.success() {
            bail!("building paced against {name}");
        }
        let out = dir.join(format!("paced-{name}.json"));
        let untraced = paced_cpu(tracer, &exe, None, &out, secs)?;
        let uprobes = paced_cpu(tracer, &exe, Some(&[]), &out, secs)?;
        let injected = paced_cpu(tracer, &exe, Some(&["--inject"]), &out, secs)?;
        println!(
            "{name:<10} {:>9.2}% {:>15.2}% {:>22.2}%",
            untraced * 100.0,
            uprobes * 100.0,
            injected * 100.0
        );
        rows.push(json!({
            "allocator": name,
            "untraced_cpus": untraced,
            "record_cpus": uprobes,
            "record_inject_cpus": injected,
        }));
    }
    if worst >= STOP_GOAL_MS {
        println!("  ABOVE GOAL: an injection stopped the data bridge {worst:.1} ms");
    }
    Ok(json!({
        "stop_ms_first": first,
        "stop_ms_again": again,
        "goal_stop_ms": STOP_GOAL_MS,
        "paced_pairs_per_sec": PAIRS_PER_SEC,
        "exact": rows,
    }))
}
