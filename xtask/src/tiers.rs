//! `cargo xtask bench`, second part: what each `watch` tier costs the traced program, measured
//! in the same run as the untraced program, interleaved round after round:
//! - the bundled data bridge at a realistic rate (about 100k allocations a second), as the CPU
//!   time the service itself spends (from /proc/PID/stat) over a fixed stretch of wall time;
//! - the allocation-heavy loop (`bench/alloc-loop.c`), as nanoseconds per malloc+free pair.
//!
//! The configurations: untraced; the in-process sampler preloaded with nothing attached (its
//! semaphore zero: what a service pays for carrying it); the sampler with `watch` attached
//! (tier usdt, at the default 512 KiB); the uprobe tiers; and heaptrack (which preloads its
//! own library and writes every event to a pipe). Every tier runs with `--max-overhead off
//! --fixed-tier`, so that what is measured is the tier itself, not the governor stepping up or
//! down. Then the usdt tier's cost against the 0.3 % goal, which is the data bridge's own CPU
//! time, one data bridge against itself (unattached, then attached at the default window),
//! from its parts: its eBPF programs (exact, the kernel's statistics), its probe hits (their
//! count, exact, at the cost `watch` measured a hit at a USDT site to have), every call's
//! traced path (the loop's nanoseconds per pair with the semaphore held but nothing sampled
//! over those with it down, at the demo's allocation rate) and each sample's user-space part
//! (the loop's cost of a sample, less its two hits and their eBPF time, exact, at the demo's
//! sample rate); beside it the service's added CPU as measured whole (noisy: its own CPU
//! wanders by about as much between windows) and `watch`'s own CPU (exact; a cost of its own,
//! on another core, not the service's). Last, at default settings with the sampler preloaded,
//! how long `watch` takes to name the demo's leak. Results go to `target/bench/watch.json`.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::bench::Killed;

/// One way of running the workloads.
struct Config {
    name: &'static str,
    /// The `watch` tier attached, if any.
    tier: Option<&'static str>,
    /// With the sampler preloaded.
    sampler: bool,
    /// Under heaptrack.
    heaptrack: bool,
    /// The sampler at a mean interval no run reaches: its traced path without the samples.
    no_samples: bool,
}

const fn config(name: &'static str, tier: Option<&'static str>, sampler: bool) -> Config {
    Config {
        name,
        tier,
        sampler,
        heaptrack: false,
        no_samples: false,
    }
}

/// A mean sampling interval that no run of the workloads allocates (it stops at 1 TiB).
const NO_SAMPLE_INTERVAL: &str = "1024G";

const CONFIGS: [Config; 8] = [
    config("untraced", None, false),
    config("sampler, nothing attached", None, true),
    // The process carries the contract: watch traces it at tier usdt whatever --tier says.
    config("sampler + watch (usdt)", Some("growth"), true),
    // Its semaphore held, but no allocation sampled: what every call pays while traced.
    Config {
        no_samples: true,
        ..config("sampler + watch, no sample", Some("growth"), true)
    },
    config("watch --tier growth", Some("growth"), false),
    config("watch --tier sampled", Some("sampled"), false),
    config("watch --tier full", Some("full"), false),
    Config {
        heaptrack: true,
        ..config("heaptrack", None, false)
    },
];

/// Messages a second of the data bridge: about 9 allocations each.
pub(crate) const DEMO_RATE: u32 = 11_000;
const DEMO_ALLOCS_PER_MESSAGE: u32 = 9;

/// The slowdown goals of the tiers at the realistic rate, in percent of the untraced CPU time.
const GOALS: [(&str, f64); 2] = [("growth", 1.0), ("sampled", 5.0)];

/// What the sampler and `watch` at tier usdt may add at the realistic rate, in percent of one
/// CPU; what the sampler with nothing attached may add per malloc+free pair of the loop, in
/// nanoseconds; how soon `watch` must name the demo's leak at default settings, in seconds.
const USDT_GOAL_CPU_PERCENT: f64 = 0.3;
const IDLE_GOAL_NS: f64 = 5.0;
const NAMED_GOAL_SECS: f64 = 60.0;
/// The mean request of bench/alloc-loop.c: 16 bytes and a uniform 0..=4080 more.
const LOOP_MEAN_BYTES: f64 = 2056.0;
/// How many times more pairs the loop makes in the configurations without uprobes: at ~20-50
/// ns a pair, a run of the uprobe tiers' length takes tens of milliseconds, where a process's
/// start and its first page faults are nanoseconds a pair, more than the idle goal.
const CHEAP_LOOP_FACTOR: u64 = 20;

/// CPU seconds `pid` has run so far, all its threads (the scheduler's nanosecond figures from
/// /proc/PID/task/*/schedstat, not the 10 ms ticks of /proc/PID/stat).
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat"))?;
        ns += stat
            .split_whitespace()
            .next()
            .context("empty schedstat")?
            .parse::<u64>()?;
    }
    Ok(ns as f64 / 1e9)
}

/// `watch` at `tier`, fixed, a window every `interval`.
fn watch(tracer: &Path, pid: u32, tier: &str, interval: &str) -> Result<Killed> {
    watch_with(tracer, pid, tier, interval, &[])
}

/// As [`watch`], with `extra` arguments (`--inject`).
fn watch_with(
    tracer: &Path,
    pid: u32,
    tier: &str,
    interval: &str,
    extra: &[&str],
) -> Result<Killed> {
    Ok(Killed(
        Command::new(tracer)
            .args(["watch", "--pid", &pid.to_string(), "--tier", tier])
            .args(extra)
            .args([
                "--max-overhead",
                "off",
                "--fixed-tier",
                "--interval",
                interval,
            ])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stderr(Stdio::null())
            .spawn()
            .context("starting watch")?,
    ))
}

/// The command that runs `program` under `c` (the sampler preloaded, or heaptrack).
fn command(c: &Config, program: &Path, sampler: &Path, dir: &Path) -> Command {
    let mut cmd = if c.heaptrack {
        let mut cmd = Command::new("heaptrack");
        cmd.arg("-o").arg(dir.join("heaptrack.bench")).arg(program);
        cmd
    } else {
        Command::new(program)
    };
    if c.sampler {
        cmd.env("LD_PRELOAD", sampler);
    }
    if c.no_samples {
        cmd.env("BRIDGE_TRACE_SAMPLE_INTERVAL", NO_SAMPLE_INTERVAL);
    }
    cmd
}

/// The process running `program` (heaptrack starts it from a script), once it runs.
fn process_of(program: &Path, launched: u32) -> Result<u32> {
    let started = Instant::now();
    loop {
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == program) {
                return Ok(pid);
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("{} never started (from pid {launched})", program.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU of the data bridge over `secs`, in CPUs, run and watched as `c` says.
/// `sampler`: the library, as [`install_sampler`] wrote it.
fn demo_cpu(
    tracer: &Path,
    demo: &Path,
    c: &Config,
    sampler: &Path,
    dir: &Path,
    secs: f64,
) -> Result<f64> {
    let service = Killed(
        command(c, demo, sampler, dir)
            .args(["--rate", &DEMO_RATE.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the data bridge")?,
    );
    let pid = process_of(demo, service.0.id())?;
    let _watch = match c.tier {
        Some(t) => Some(watch(tracer, pid, t, "1s")?),
        None => None,
    };
    // Attach, probe calibration and unwind tables first.
    std::thread::sleep(Duration::from_millis(2500));
    let (c0, t0) = (cpu_seconds(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (c1, t1) = (cpu_seconds(pid)?, Instant::now());
    if c.heaptrack {
        // The script's child: stopped by itself, heaptrack then writes its file and exits.
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    Ok((c1 - c0) / t1.duration_since(t0).as_secs_f64())
}

/// Nanoseconds per pair of the loop, run and watched as `c` says.
fn loop_ns(
    tracer: &Path,
    workload: &Path,
    c: &Config,
    sampler: &Path,
    dir: &Path,
    iterations: u64,
) -> Result<f64> {
    let child = command(c, workload, sampler, dir)
        .args([&iterations.to_string(), "10", "2000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting alloc-loop")?;
    let _watch = match c.tier {
        Some(t) => Some(watch(tracer, process_of(workload, child.id())?, t, "1s")?),
        None => None,
    };
    let out = child.wait_with_output()?;
    // Heaptrack says more than the loop's figure.
    crate::peers::ns_per_pair(&String::from_utf8_lossy(&out.stdout))
}

/// Seconds from its start until `watch`, at default settings, names the data bridge's leak (at
/// [`DEMO_RATE`], the load whose cost the rows above measure, the sampler preloaded at its
/// default interval), None if not within `limit`; and what `watch` measured a probe hit to
/// cost, at each kind of place.
fn time_to_name(
    tracer: &Path,
    demo: &Path,
    sampler: &Path,
    limit: f64,
) -> Result<(Option<f64>, String)> {
    let _service = Killed(
        Command::new(demo)
            .args(["--rate", &DEMO_RATE.to_string()])
            .env("LD_PRELOAD", sampler)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the data bridge")?,
    );
    let pid = process_of(demo, _service.0.id())?;
    let mut watch = Killed(
        Command::new(tracer)
            .args(["watch", "--pid", &pid.to_string()])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .context("starting watch")?,
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = watch.0.stderr.take().context("watch's stderr")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut usdt = false;
    let mut costs = String::new();
    while started.elapsed().as_secs_f64() < limit {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) if line.contains("[tier usdt]") => usdt = true,
            Ok(line) if line.contains("a probe hit costs") => {
                costs = line
                    .split("costs ")
                    .nth(1)
                    .and_then(|l| l.split(", charged").next())
                    .unwrap_or_default()
                    .to_string();
            }
            Ok(line) if line.contains("leak at reject_message") => {
                if !usdt {
                    bail!("watch did not trace the data bridge at tier usdt");
                }
                return Ok((Some(started.elapsed().as_secs_f64()), costs));
            }
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => bail!("watch ended"),
        }
    }
    Ok((None, costs))
}

/// Nanoseconds of a probe hit at a USDT site, from `watch`'s line ("... 0.70 µs at a USDT
/// site").
fn usdt_hit_ns(costs: &str) -> Option<f64> {
    let before = costs.split(" µs at a USDT site").next()?;
    let number = before.rsplit([' ', ',']).next()?;
    number.parse::<f64>().ok().map(|us| us * 1000.0)
}

/// One cycle of [`usdt_paired`], in CPUs.
struct Paired {
    /// The data bridge's CPU attached minus unattached: everything the service pays (the
    /// sampler's traced path, probe hits, eBPF), but the demo's own CPU varies by more than
    /// that between windows.
    added: f64,
    /// The eBPF programs of `watch` (the kernel's run-time statistics): exact.
    bpf: f64,
    /// Probe hits a second at the USDT sites: exact.
    hits: f64,
    /// `watch` itself, in user space and its syscalls: exact.
    watch: f64,
}

/// What `watch` attached at tier usdt costs one data bridge with the sampler preloaded: the
/// same process measured `secs` with nothing attached, then `secs` with `watch` attached,
/// `cycles` times (the CPU of separate runs of the demo varies by more than the 0.3 % to be
/// seen; one process against itself less so), and the exact parts of the attached windows.
fn usdt_paired(
    tracer: &Path,
    demo: &Path,
    sampler: Option<&Path>,
    cycles: usize,
    secs: f64,
) -> Result<Vec<Paired>> {
    let _stats = crate::bench::BpfStats::enable()?;
    let mut cmd = Command::new(demo);
    cmd.args(["--rate", &DEMO_RATE.to_string()]);
    // Preloaded, or (no sampler given) injected by each watch: the first loads the library,
    // the others find it there, idle between them.
    match sampler {
        Some(lib) => cmd.env("LD_PRELOAD", lib),
        None => &mut cmd,
    };
    let inject: &[&str] = if sampler.is_none() {
        &["--inject"]
    } else {
        &[]
    };
    let service = Killed(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the data bridge")?,
    );
    let pid = service.0.id();
    std::thread::sleep(Duration::from_secs(2));
    // CPUs used over `secs` by the data bridge, and by the tracer (its pid, and the programs
    // that were not loaded before it started) and its eBPF programs.
    let over = |secs: f64, tracer: Option<(u32, &[Program])>| -> Result<(f64, f64, f64, f64)> {
        let bpf = || tracer.map_or(Ok((0, 0)), |(_, before)| bpf_since(before));
        let own = || tracer.map_or(Ok(0.0), |(w, _)| cpu_seconds(w));
        let (c0, b0, w0, t0) = (cpu_seconds(pid)?, bpf()?, own()?, Instant::now());
        std::thread::sleep(Duration::from_secs_f64(secs));
        let (c1, b1, w1) = (cpu_seconds(pid)?, bpf()?, own()?);
        let t = t0.elapsed().as_secs_f64();
        Ok((
            (c1 - c0) / t,
            (b1.0 - b0.0) as f64 / 1e9 / t,
            (b1.1 - b0.1) as f64 / t,
            (w1 - w0) / t,
        ))
    };
    let mut cycles_seen = Vec::new();
    for _ in 0..cycles {
        let (idle, _, _, _) = over(secs, None)?;
        let before = bpf_programs()?;
        // Its default window: what a service watched for good pays.
        let w = watch_with(tracer, pid, "growth", "10s", inject)?;
        std::thread::sleep(Duration::from_millis(2500));
        let (attached, bpf, hits, watch) = over(secs, Some((w.0.id(), &before)))?;
        drop(w);
        // Its links closed: the semaphores are down again.
        std::thread::sleep(Duration::from_millis(500));
        cycles_seen.push(Paired {
            added: attached - idle,
            bpf,
            hits,
            watch,
        });
    }
    Ok(cycles_seen)
}

/// eBPF nanoseconds per probe hit in the loop at the default interval, `watch` attached (the
/// kernel's statistics over the loop's run, which holds on after it so that they can be read).
fn loop_bpf_per_hit(
    tracer: &Path,
    workload: &Path,
    sampler: &Path,
    iterations: u64,
) -> Result<f64> {
    let _stats = crate::bench::BpfStats::enable()?;
    let before = bpf_programs()?;
    let mut child = Killed(
        Command::new(workload)
            .env("LD_PRELOAD", sampler)
            .args([&iterations.to_string(), "10", "4000", "2000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting alloc-loop")?,
    );
    let _watch = watch(tracer, child.0.id(), "growth", "1s")?;
    std::thread::sleep(Duration::from_millis(3000));
    let b0 = bpf_since(&before)?;
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().context("alloc-loop's stdout")?).read_line(&mut line)?;
    let b1 = bpf_since(&before)?;
    let hits = b1.1 - b0.1;
    if hits == 0 {
        bail!("no probe hit in alloc-loop with watch attached (it printed {line:?})");
    }
    Ok((b1.0 - b0.0) as f64 / hits as f64)
}

/// One paired series as written to watch.json: per cycle, and the total of its parts.
fn paired_json(p: &[Paired], total: f64) -> Value {
    json!({
        "added_cpus": p.iter().map(|p| p.added).collect::<Vec<_>>(),
        "hits_per_sec": p.iter().map(|p| p.hits).collect::<Vec<_>>(),
        "bpf_cpus": p.iter().map(|p| p.bpf).collect::<Vec<_>>(),
        "watch_cpus": p.iter().map(|p| p.watch).collect::<Vec<_>>(),
        "total_percent_of_one": total,
    })
}

/// An eBPF program loaded, as `bpftool` shows the kernel's statistics of it (which
/// [`crate::bench::BpfStats`] switches on).
struct Program {
    id: u64,
    name: String,
    run_ns: u64,
    runs: u64,
}

/// The eBPF programs loaded now.
fn bpf_programs() -> Result<Vec<Program>> {
    let out = crate::output(Command::new("bpftool").args(["--json", "prog", "show"]))?;
    let progs: Value = serde_json::from_str(&out).context("bpftool's JSON")?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(Program {
                id: p["id"].as_u64()?,
                name: p["name"].as_str().unwrap_or_default().to_string(),
                run_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                runs: p["run_cnt"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

/// Of the programs loaded since `before` was listed (those of the `watch` started since: the
/// bench runs nothing else that loads programs), the nanoseconds run so far and the runs of
/// those at the USDT sites (each a probe hit).
fn bpf_since(before: &[Program]) -> Result<(u64, u64)> {
    Ok(bpf_programs()?
        .into_iter()
        .filter(|p| !before.iter().any(|b| b.id == p.id))
        .fold((0, 0), |(ns, hits), p| {
            let usdt = p.name.starts_with("usdt_");
            (ns + p.run_ns, hits + if usdt { p.runs } else { 0 })
        }))
}

/// The sampler, written out by the binary that carries it.
fn install_sampler(tracer: &Path, dir: &Path) -> Result<PathBuf> {
    let out = Command::new(tracer)
        .args(["sampler", "install"])
        .arg(dir.join("sampler"))
        .stderr(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("bridge-trace sampler install failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

pub fn tiers(tracer: &Path, dir: &Path, short: bool) -> Result<Value> {
    let demo = crate::bench::build_demo(dir)?;
    let workload = dir.join("alloc-loop");
    let (rounds, secs, iterations) = if short {
        (1, 2.0, 20_000)
    } else {
        (5, 10.0, 1_000_000)
    };
    let sampler = install_sampler(tracer, dir)?;
    let configs: Vec<&Config> = CONFIGS
        .iter()
        // Heaptrack's row is left out where it is not installed.
        .filter(|c| !c.heaptrack || crate::peers::installed("heaptrack"))
        .collect();
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        eprintln!("bench: watch tiers, round {} of {rounds}", round + 1);
        for (i, c) in configs.iter().enumerate() {
            cpu[i].push(demo_cpu(tracer, &demo, c, &sampler, dir, secs)?);
            let pairs = if (c.tier.is_none() && !c.heaptrack) || c.sampler {
                iterations * CHEAP_LOOP_FACTOR
            } else {
                iterations
            };
            ns[i].push(loop_ns(tracer, &workload, c, &sampler, dir, pairs)?);
        }
    }
    let median = |v: &[f64]| crate::bench::median(v.iter().copied());
    let (base_cpu, base_ns) = (median(&cpu[0]), median(&ns[0]));
    println!();
    println!(
        "watch tiers: the data bridge at {DEMO_RATE} messages/s (about {}k allocations/s), \
         its own CPU over {secs:.0} s; alloc-loop, {iterations} pairs ({} without uprobes); \
         median of {rounds}",
        DEMO_RATE * 9 / 1000,
        iterations * CHEAP_LOOP_FACTOR
    );
    println!(
        "{:<26} {:>12} {:>12} {:>16} {:>14} {:>12}",
        "configuration",
        "demo CPU %",
        "slowdown %",
        "extra CPU % of 1",
        "loop ns/pair",
        "x untraced"
    );
    let mut results = Vec::new();
    let mut missed = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let (name, tier) = (config.name, config.tier.filter(|_| !config.sampler));
        let (c, n) = (median(&cpu[i]), median(&ns[i]));
        let slowdown = (c - base_cpu) / base_cpu * 100.0;
        println!(
            "{name:<26} {:>12.2} {:>12.1} {:>16.2} {:>14.1} {:>11.2}x",
            c * 100.0,
            slowdown,
            (c - base_cpu) * 100.0,
            n,
            n / base_ns
        );
        if config.sampler && config.tier.is_none() && n - base_ns > IDLE_GOAL_NS {
            missed.push(format!(
                "{name}: {:.1} ns added per pair (goal: at most {IDLE_GOAL_NS} ns)",
                n - base_ns
            ));
        }
        if let Some((_, goal)) = GOALS.iter().find(|(t, _)| Some(*t) == tier) {
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
            "demo_extra_cpu_percent_of_one": (c - base_cpu) * 100.0,
            "loop_ns_added_per_pair": n - base_ns,
        }));
    }
    let (named, costs) = time_to_name(tracer, &demo, &sampler, if short { 90.0 } else { 180.0 })?;
    println!("a probe hit, as watch measured it: {costs}");
    let nop_ns = usdt_hit_ns(&costs)
        .with_context(|| format!("no cost at a USDT site in watch's line: {costs:?}"))?;
    let loop_median = |name: &str| {
        configs
            .iter()
            .position(|c| c.name == name)
            .map(|i| median(&ns[i]))
            .with_context(|| format!("no loop figure for {name}"))
    };
    // What every call pays while traced: the loop's pairs with the semaphore held and nothing
    // sampled over those with it down.
    let fast_ns = (loop_median("sampler + watch, no sample")?
        - loop_median("sampler, nothing attached")?)
    .max(0.0);
    // What a sample costs the loop in all (one in LOOP_MEAN_BYTES / 512 KiB pairs is sampled):
    // its two probe hits (their eBPF time exact, the rest as watch measured a hit) and the
    // rest in user space (the sampler's draw, move and table, the trampolines, the system
    // calls' entries and exits, and what that does to the loop's heap and caches).
    let samples_per_pair = LOOP_MEAN_BYTES / f64::from(512u32 << 10);
    let sample_ns = (loop_median("sampler + watch (usdt)")?
        - loop_median("sampler + watch, no sample")?)
    .max(0.0)
        / samples_per_pair;
    let loop_bpf_ns = loop_bpf_per_hit(tracer, &workload, &sampler, iterations)?;
    let loop_kernel_per_sample = 2.0 * (loop_bpf_ns + nop_ns);
    let user_per_sample = (sample_ns - loop_kernel_per_sample).max(0.0);
    println!(
        "alloc-loop: {fast_ns:.1} ns a pair more while traced, nothing sampled; a sample \
         {:.1} µs in all: two probe hits {:.1} µs (eBPF {:.1} µs a hit, exact, + {:.2} µs as \
         watch measured a hit), the rest {:.1} µs in user space",
        sample_ns / 1000.0,
        loop_kernel_per_sample / 1000.0,
        loop_bpf_ns / 1000.0,
        nop_ns / 1000.0,
        user_per_sample / 1000.0
    );
    let demo_allocs = f64::from(DEMO_RATE * DEMO_ALLOCS_PER_MESSAGE);
    let (cycles, paired_secs) = if short { (2, 3.0) } else { (8, 10.0) };
    let paired = usdt_paired(tracer, &demo, Some(&sampler), cycles, paired_secs)?;
    let injected = usdt_paired(tracer, &demo, None, cycles, paired_secs)?;
    let mut parts = |label: &str, p: &[Paired]| {
        let pct = |f: &dyn Fn(&Paired) -> f64| crate::bench::median(p.iter().map(f)) * 100.0;
        let (added, bpf, own) = (pct(&|p| p.added), pct(&|p| p.bpf), pct(&|p| p.watch));
        let hits_per_sec = crate::bench::median(p.iter().map(|p| p.hits));
        let hits = hits_per_sec * nop_ns / 1e9 * 100.0;
        let traced = fast_ns * demo_allocs / 1e9 * 100.0;
        let user = user_per_sample * hits_per_sec / 2.0 / 1e9 * 100.0;
        let total = bpf + hits + traced + user;
        let added_pct: Vec<f64> = p.iter().map(|p| p.added * 100.0).collect();
        let (lo, hi) = crate::bench::min_max(&added_pct);
        println!(
            "{label}, one data bridge against itself, {cycles} cycles of {paired_secs:.0} s \
             unattached / attached (medians), the service's own CPU: its eBPF programs \
             {bpf:.3}% (exact) + {hits_per_sec:.0} probe hits a second {hits:.3}% ({nop_ns:.0} \
             ns each, as watch measured a hit) + every call's traced path {traced:.3}% \
             ({fast_ns:.1} ns at {demo_allocs:.0} allocations/s) + the samples in user space \
             {user:.3}% ({:.1} µs each, as in alloc-loop) = {total:.2}% (goal: at most \
             {USDT_GOAL_CPU_PERCENT}%){}",
            user_per_sample / 1000.0,
            if total <= USDT_GOAL_CPU_PERCENT {
                ""
            } else {
                "  ABOVE GOAL"
            }
        );
        println!(
            "  measured whole, the service's added CPU: {added:.2}% (from {lo:.2} to {hi:.2}, \
             as noisy as its CPU between windows); watch itself, in its own process: {own:.2}%"
        );
        if total > USDT_GOAL_CPU_PERCENT {
            missed.push(format!(
                "{label}: {total:.2}% of a CPU of the service's own (goal: at most \
                 {USDT_GOAL_CPU_PERCENT}%)"
            ));
        }
        total
    };
    let preloaded_total = parts("sampler + watch (usdt)", &paired);
    let injected_total = parts("sampler injected + watch --inject (usdt)", &injected);
    match named {
        Some(t) => {
            println!(
            "sampler + watch at default settings: the demo's leak named leaking after {t:.0} s \
             (goal: within {NAMED_GOAL_SECS:.0} s){}",
            if t <= NAMED_GOAL_SECS { "" } else { "  ABOVE GOAL" }
        )
        }
        None => println!("sampler + watch at default settings: the demo's leak never named"),
    }
    if named.is_none_or(|t| t > NAMED_GOAL_SECS) {
        missed.push(format!(
            "sampler + watch: the leak named after {} (goal {NAMED_GOAL_SECS} s)",
            named.map_or("never".into(), |t| format!("{t:.0} s"))
        ));
    }
    for m in &missed {
        println!("  ABOVE GOAL: {m}");
    }
    Ok(json!({
        "demo": {"program": "demo/data-bridge.c", "rate": DEMO_RATE, "seconds": secs},
        "loop": {"program": "bench/alloc-loop.c", "iterations": iterations,
                 "iterations_without_uprobes": iterations * CHEAP_LOOP_FACTOR, "depth": 10},
        "rounds": rounds,
        "goals_slowdown_percent": GOALS.iter().map(|(t, g)| json!({"tier": t, "goal": g})).collect::<Vec<_>>(),
        "results": results,
        "goal_usdt_cpu_percent_of_one": USDT_GOAL_CPU_PERCENT,
        "goal_sampler_idle_ns_per_pair": IDLE_GOAL_NS,
        "usdt_hit_ns": nop_ns,
        "usdt_traced_ns_per_pair_unsampled": fast_ns,
        "usdt_loop_ns_per_sample": sample_ns,
        "usdt_loop_bpf_ns_per_hit": loop_bpf_ns,
        "usdt_loop_user_ns_per_sample": user_per_sample,
        "usdt_preloaded": paired_json(&paired, preloaded_total),
        "usdt_injected": paired_json(&injected, injected_total),
        "usdt_leak_named_after_secs": named,
        "probe_hit_costs": costs,
        "goal_named_secs": NAMED_GOAL_SECS,
        "missed": missed,
    }))
}
