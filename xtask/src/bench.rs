//! `cargo xtask bench`: what tracing costs the traced program, measured on this machine.
//!
//! The workload (`bench/alloc-loop.c`) makes malloc+free pairs 10 frames below main, built
//! with frame pointers so that both stack walks see the same frames. Configurations run
//! interleaved, round after round, so that a slow moment of the machine hits them all alike:
//! untraced, `record --unwind fp`, `record --unwind dwarf`. For each: nanoseconds per pair as
//! the workload measures itself, and the cost of the allocation entry program (where the stack
//! is walked) from the kernel's own statistics (`kernel.bpf_stats_enabled`, switched on for
//! the run and restored after). Results go to `target/bench/unwind.json`. With `--against REV`
//! the same two `record` rows run again, interleaved, with the tracer built from git revision
//! REV (in `target/bench/against-REV/`, built once): the cost a change adds per pair.
use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{build_release, output, root, run};

#[derive(Clone)]
struct Config {
    name: String,
    /// None: untraced.
    unwind: Option<&'static str>,
    /// The tracer of another revision (`--against`), else this tree's.
    tracer: Option<std::path::PathBuf>,
}

fn configs(against: Option<(&str, std::path::PathBuf)>) -> Vec<Config> {
    let row = |name: &str, unwind| Config {
        name: name.into(),
        unwind,
        tracer: None,
    };
    let mut out = vec![
        row("untraced", None),
        row("record --unwind fp", Some("fp")),
        row("record --unwind dwarf", Some("dwarf")),
    ];
    if let Some((rev, tracer)) = against {
        for unwind in ["fp", "dwarf"] {
            out.push(Config {
                name: format!("record --unwind {unwind} at {rev}"),
                unwind: Some(unwind),
                tracer: Some(tracer.clone()),
            });
        }
    }
    out
}

/// The most a change may add to `record`'s cost per malloc+free pair (`--against`).
const AGAINST_GOAL: f64 = 0.05;

/// `bridge-trace` as built from git revision `rev`, built once into `dir/against-REV/`.
fn tracer_at(rev: &str, dir: &Path) -> Result<std::path::PathBuf> {
    let hash = output(Command::new("git").args(["rev-parse", "--short", rev]))?;
    let hash = hash.trim();
    let base = dir.join(format!("against-{hash}"));
    let bin = base.join("bridge-trace");
    if bin.exists() {
        return Ok(bin);
    }
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    eprintln!("bench: building bridge-trace at {rev} ({hash}) for --against");
    let tar = base.join("src.tar");
    run(Command::new("git")
        .args(["archive", "--format=tar", "-o"])
        .arg(&tar)
        .arg(hash)
        .current_dir(root()))?;
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&src))?;
    run(Command::new("cargo")
        .args(["build", "--release", "-p", "bridge-trace"])
        .env("CARGO_TARGET_DIR", base.join("target"))
        .current_dir(&src))?;
    std::fs::copy(base.join("target/release/bridge-trace"), &bin)?;
    Ok(bin)
}

/// The stack walk with unwind tables may cost at most this many times the frame-pointer walk.
const DWARF_GOAL: f64 = 2.0;

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    ns_per_pair: f64,
    /// Average run time of the allocation entry program (malloc_enter), nanoseconds.
    entry_ns: Option<f64>,
}

/// Switches the kernel's BPF run-time statistics on, and back to what they were on drop.
pub(crate) struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(crate) fn enable() -> Result<BpfStats> {
        let before =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS} (root?)"))?;
        Ok(BpfStats { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.before.trim());
    }
}

pub fn bench(
    short: bool,
    watch_only: bool,
    inject_only: bool,
    against: Option<&str>,
    rounds: Option<usize>,
) -> Result<()> {
    let root = root();
    let tracer = build_release()?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let workload = dir.join("alloc-loop");
    run(Command::new("gcc")
        .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&workload)
        .arg(root.join("bench/alloc-loop.c")))?;
    if inject_only {
        return injection(&tracer, &dir, short);
    }
    if watch_only {
        return watch_tiers(&tracer, &dir, short);
    }
    let (iterations, default_rounds, depth) = if short {
        (20_000u64, 1usize, 10u32)
    } else {
        (200_000, 5, 10)
    };
    let rounds = rounds.unwrap_or(default_rounds).max(1);
    let against = match against {
        Some(rev) => Some((rev, tracer_at(rev, &dir)?)),
        None => None,
    };
    let configs = configs(against.clone());
    let _stats = BpfStats::enable()?;
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        eprintln!("bench: round {} of {rounds}", round + 1);
        // Every other round in reverse: no configuration always runs right after another.
        let mut order: Vec<usize> = (0..configs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let c = &configs[i];
            let tracer = c.tracer.as_deref().unwrap_or(&tracer);
            samples[i].push(measure(c, tracer, &workload, &dir, iterations, depth)?);
        }
    }

    let untraced = median(samples[0].iter().map(|s| s.ns_per_pair));
    let mut results = Vec::new();
    println!();
    println!(
        "alloc-loop: {iterations} malloc(16..4096)+free pairs, {depth} frames below main, \
         median of {rounds}"
    );
    println!(
        "{:<24} {:>14} {:>22} {:>12} {:>26}",
        "configuration", "ns per pair", "min-max", "x untraced", "entry program ns per call"
    );
    for (c, s) in configs.iter().zip(&samples) {
        let ns: Vec<f64> = s.iter().map(|s| s.ns_per_pair).collect();
        let med = median(ns.iter().copied());
        let (lo, hi) = min_max(&ns);
        let entry: Vec<f64> = s.iter().filter_map(|s| s.entry_ns).collect();
        let entry_med = (!entry.is_empty()).then(|| median(entry.iter().copied()));
        println!(
            "{:<24} {:>14.0} {:>22} {:>11.1}x {:>26}",
            c.name,
            med,
            format!("{lo:.0}-{hi:.0}"),
            med / untraced,
            entry_med.map_or("-".into(), |e| format!("{e:.0}")),
        );
        results.push(json!({
            "configuration": c.name,
            "ns_per_pair": ns,
            "median_ns_per_pair": med,
            "ratio_to_untraced": med / untraced,
            "entry_program_ns": entry,
            "median_entry_program_ns": entry_med,
        }));
    }
    let entry = |i: usize| median(samples[i].iter().filter_map(|s| s.entry_ns));
    let (fp, dwarf) = (entry(1), entry(2));
    let ratio = dwarf / fp;
    let pair_ratio = median(samples[2].iter().map(|s| s.ns_per_pair))
        / median(samples[1].iter().map(|s| s.ns_per_pair));
    println!();
    println!(
        "stack walk: dwarf entry program {dwarf:.0} ns against fp {fp:.0} ns per allocation: \
         {ratio:.2}x (goal: at most {DWARF_GOAL}x){}",
        if ratio <= DWARF_GOAL {
            ""
        } else {
            "  ABOVE GOAL"
        }
    );
    println!("end to end: dwarf {pair_ratio:.2}x the cost of fp per malloc+free pair");
    if let Some((rev, _)) = &against {
        let pair = |i: usize| median(samples[i].iter().map(|s| s.ns_per_pair));
        let added: Vec<f64> = [(1, 3), (2, 4)]
            .iter()
            .map(|&(now, then)| pair(now) / pair(then) - 1.0)
            .collect();
        for (unwind, a) in ["fp", "dwarf"].iter().zip(&added) {
            println!(
                "against {rev}: record --unwind {unwind} costs {:+.1}% per pair (goal: at most \
                 {:+.0}%){}",
                a * 100.0,
                AGAINST_GOAL * 100.0,
                if *a <= AGAINST_GOAL {
                    ""
                } else {
                    "  ABOVE GOAL"
                }
            );
        }
        let doc = json!({"revision": rev, "added_fp": added[0], "added_dwarf": added[1],
            "goal": AGAINST_GOAL, "results": results, "rounds": rounds});
        // Only the rows it compares: the rest of the benchmark does not depend on them.
        let out = dir.join("against.json");
        std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
        println!("bench: wrote {}", out.display());
        return Ok(());
    }
    let tables = table_costs(&tracer, &dir)?;
    watch_tiers(&tracer, &dir, short)?;
    let survey = crate::survey::survey(&tracer, &dir, short)?;
    let survey_out = dir.join("allocators.json");
    std::fs::write(&survey_out, serde_json::to_string_pretty(&survey)? + "\n")?;
    println!("bench: wrote {}", survey_out.display());
    let peers = crate::peers::peers(&tracer, &dir, short)?;
    let peers_out = dir.join("peers.json");
    std::fs::write(&peers_out, serde_json::to_string_pretty(&peers)? + "\n")?;
    println!("bench: wrote {}", peers_out.display());
    let out = dir.join("unwind.json");
    let doc = json!({
        "unwind_tables": tables,
        "workload": {"program": "bench/alloc-loop.c", "iterations": iterations, "depth": depth},
        "rounds": rounds,
        "results": results,
        "dwarf_over_fp_entry_program": ratio,
        "dwarf_over_fp_per_pair": pair_ratio,
        "goal_dwarf_over_fp": DWARF_GOAL,
        "kernel": output(Command::new("uname").arg("-r"))?.trim(),
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("bench: wrote {}", out.display());
    if ratio > DWARF_GOAL {
        bail!("the dwarf stack walk costs {ratio:.2}x the frame-pointer walk (goal {DWARF_GOAL}x)");
    }
    Ok(())
}

/// The `watch` tiers part, written to `watch.json`.
fn watch_tiers(tracer: &Path, dir: &Path, short: bool) -> Result<()> {
    let tiers = crate::tiers::tiers(tracer, dir, short)?;
    let watch_out = dir.join("watch.json");
    std::fs::write(&watch_out, serde_json::to_string_pretty(&tiers)? + "\n")?;
    println!("bench: wrote {}", watch_out.display());
    injection(tracer, dir, short)
}

/// The `--inject` part, written to `inject.json`.
fn injection(tracer: &Path, dir: &Path, short: bool) -> Result<()> {
    let doc = crate::inject::inject(tracer, dir, short)?;
    let out = dir.join("inject.json");
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("bench: wrote {}", out.display());
    Ok(())
}

/// What compiling the unwind tables of two real programs costs: Debian's python3.11, and rustc
/// with its 200 MB libLLVM and 150 MB librustc_driver.
fn table_costs(tracer: &Path, dir: &Path) -> Result<Vec<Value>> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let rustc = Path::new(sysroot.trim()).join("bin/rustc");
    let programs: [(&str, Vec<String>); 2] = [
        (
            "python3.11",
            vec!["/usr/bin/python3.11".into(), "-c".into(), "pass".into()],
        ),
        (
            "rustc",
            vec![rustc.to_string_lossy().into_owned(), "--version".into()],
        ),
    ];
    println!();
    println!("unwind tables, compiled off the tracing path:");
    let mut out = Vec::new();
    for (name, argv) in programs {
        let report = dir.join("tables.json");
        output(
            Command::new(tracer)
                .args(["record", "--quiet", "-o"])
                .arg(&report)
                .arg("--")
                .args(&argv),
        )?;
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
        let u = &report["meta"]["unwind"];
        println!(
            "  {name:<12} {:>3} objects {:>9} rows {:>6.0} ms (slowest: {} {:.0} ms)",
            u["objects"],
            u["rows"],
            u["build_ms"].as_f64().unwrap_or(0.0),
            u["slowest"][0].as_str().unwrap_or("-"),
            u["slowest"][1].as_f64().unwrap_or(0.0),
        );
        out.push(json!({"program": name, "unwind": u}));
    }
    Ok(out)
}

fn measure(
    c: &Config,
    tracer: &Path,
    workload: &Path,
    dir: &Path,
    iterations: u64,
    depth: u32,
) -> Result<Sample> {
    let args = [iterations.to_string(), depth.to_string()];
    let Some(unwind) = c.unwind else {
        let out = output(Command::new(workload).args(&args))?;
        return Ok(Sample {
            ns_per_pair: first_number(&out)?,
            entry_ns: None,
        });
    };
    let report = dir.join("run.json");
    let out = output(
        Command::new(tracer)
            .args(["record", "--quiet", "--unwind", unwind, "-o"])
            .arg(&report)
            .arg("--")
            .arg(workload)
            .args(&args),
    )?;
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let entry_ns = report["meta"]["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["program"] == "malloc_enter")
        .and_then(|p| {
            let runs = p["runs"].as_f64()?;
            let ns = p["run_time_ns"].as_f64()?;
            (runs > 0.0 && ns > 0.0).then_some(ns / runs)
        });
    Ok(Sample {
        // The workload's own line comes first (it shares bridge-trace's stdout).
        ns_per_pair: first_number(&out)?,
        entry_ns,
    })
}

pub(crate) fn first_number(text: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.trim().parse().ok())
        .with_context(|| format!("no measurement in the workload's output: {text}"))
}

pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// A child process killed (SIGTERM) and reaped when dropped.
pub(crate) struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child, not reaped yet.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// The resident memory of `pid`, in bytes.
pub(crate) fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

/// (max_entries, memory in bytes: the kernel's `memlock` figure) of every BPF map `pid` holds.
pub(crate) fn bpf_maps(pid: u32) -> Result<Vec<(u64, u64)>> {
    let mut maps = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(fd?.path()).unwrap_or_default();
        if !info.contains("map_type:") {
            continue;
        }
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        maps.push((field("max_entries:"), field("memlock:")));
    }
    Ok(maps)
}

/// Builds the bundled data bridge into `dir` (frame pointers, as the tiers bench has always
/// measured it) and returns its path: one build for every benchmark that runs it.
pub(crate) fn build_demo(dir: &Path) -> Result<std::path::PathBuf> {
    let demo = dir.join("data-bridge");
    run(Command::new("gcc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&demo)
        .arg(root().join("demo/data-bridge.c")))?;
    Ok(demo)
}
