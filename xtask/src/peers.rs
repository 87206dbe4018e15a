//! `cargo xtask bench`, third part: bridge-trace beside the floor and its peers, interleaved in
//! one run on the allocation loop (`bench/alloc-loop.c`, ns per malloc+free pair as it measures
//! itself):
//! - the floor: empty probes on malloc (entry and return, the return capturing the user stack
//!   with the kernel's helper) and free, at the places bridge-trace uses (`bridge-trace floor`),
//!   and its parts alone: malloc's entry; entry and return; entry, return and stack; and an
//!   empty probe on free's first instruction, which the kernel single-steps;
//! - `record --unwind fp` and `--unwind dwarf`;
//! - a bpftrace script doing what bcc's and libbpf-tools' memleak do (uprobes on malloc and free
//!   entries, a uretprobe, the user stack per allocation), when Debian's bpftrace is installed;
//! - heaptrack (LD_PRELOAD; it needs the program restarted), when installed;
//! - libbpf-tools' memleak: reported as skipped (see [`LIBBPF_TOOLS_SKIPPED`]).
//!
//! Then the tracer's own memory with 1 M outstanding allocations (`bench/hold.c`), and the time
//! from Ctrl-C to a written flamegraph with 10 000 distinct stacks (`bench/stacks.c`). Results
//! go to `target/bench/peers.json`.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{bench::median, root, run};

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

/// Why libbpf-tools' memleak has no row.
const LIBBPF_TOOLS_SKIPPED: &str = "Debian 12's libbpf-tools (0.26) has no memleak; \
     bpfcc-tools' memleak is BCC, which compiles at run time against kernel headers this \
     kernel has none of";

/// The goals of issue 5.
const FLOOR_GOAL: f64 = 1.2;
const BPFTRACE_GOAL: f64 = 8.0;
const CTRL_C_GOAL_SECS: f64 = 2.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    Untraced,
    MallocEntry,
    MallocReturn,
    MallocStack,
    FreeEntry,
    Floor,
    RecordFp,
    RecordDwarf,
    Bpftrace,
    Heaptrack,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::MallocEntry => "empty uprobe on malloc",
            Config::MallocReturn => "empty uprobe + uretprobe on malloc",
            Config::MallocStack => "same, user stack in the uretprobe",
            Config::FreeEntry => "empty uprobe on free's 1st instruction",
            Config::Floor => "floor: same + free probe placed",
            Config::RecordFp => "bridge-trace record --unwind fp",
            Config::RecordDwarf => "bridge-trace record --unwind dwarf",
            Config::Bpftrace => "bpftrace memleak-style script",
            Config::Heaptrack => "heaptrack (LD_PRELOAD, restart)",
        }
    }
}

/// What bcc's and libbpf-tools' memleak do, as a bpftrace script.
fn bpftrace_script() -> String {
    format!(
        "uprobe:{LIBC}:malloc {{ @size[tid] = arg0; }}\n\
         uretprobe:{LIBC}:malloc /@size[tid]/ {{ @allocs[retval] = @size[tid]; \
         @stacks[retval] = ustack; delete(@size[tid]); }}\n\
         uprobe:{LIBC}:free {{ delete(@allocs[arg0]); delete(@stacks[arg0]); }}\n"
    )
}

pub(crate) fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The loop's own figure: the last line of its output that is a number.
pub(crate) fn ns_per_pair(text: &str) -> Result<f64> {
    text.lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .next_back()
        .with_context(|| format!("no figure from alloc-loop in {text:?}"))
}

/// Runs the loop under `config`; None when the peer is not installed.
fn measure(
    config: Config,
    tracer: &Path,
    workload: &Path,
    dir: &Path,
    n: u64,
) -> Result<Option<f64>> {
    let n = n.to_string();
    // Tools that attach to a running pid get the loop with a delay first.
    let delayed = |delay_ms: &str| -> Result<std::process::Child> {
        Command::new(workload)
            .args([&n, "10", delay_ms])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting alloc-loop")
    };
    let finish = |child: std::process::Child, mut tool: std::process::Child| -> Result<f64> {
        let out = child.wait_with_output()?;
        let _ = tool.kill();
        let _ = tool.wait();
        ns_per_pair(&String::from_utf8_lossy(&out.stdout))
    };
    let ns = match config {
        Config::Untraced => {
            let out = Command::new(workload).args([&n, "10"]).output()?;
            ns_per_pair(&String::from_utf8_lossy(&out.stdout))?
        }
        Config::MallocEntry
        | Config::MallocReturn
        | Config::MallocStack
        | Config::FreeEntry
        | Config::Floor => {
            let parts = match config {
                Config::MallocEntry => "malloc-entry",
                Config::MallocReturn => "malloc-return",
                Config::MallocStack => "malloc-stack",
                Config::FreeEntry => "free-entry",
                _ => "all",
            };
            let child = delayed("1500")?;
            let tool = Command::new(tracer)
                .args(["floor", "--parts", parts, "--pid", &child.id().to_string()])
                .stderr(Stdio::null())
                .spawn()?;
            finish(child, tool)?
        }
        Config::RecordFp | Config::RecordDwarf => {
            let unwind = if config == Config::RecordFp {
                "fp"
            } else {
                "dwarf"
            };
            let out = Command::new(tracer)
                .args(["record", "--quiet", "--unwind", unwind, "-o"])
                .arg(dir.join("peers-run.json"))
                .arg("--")
                .arg(workload)
                .args([&n, "10"])
                .stderr(Stdio::null())
                .output()?;
            ns_per_pair(&String::from_utf8_lossy(&out.stdout))?
        }
        Config::Bpftrace => {
            if !installed("bpftrace") {
                return Ok(None);
            }
            // bpftrace compiles and attaches in about a second.
            let child = delayed("4000")?;
            let tool = Command::new("bpftrace")
                .args([
                    "-q",
                    "-p",
                    &child.id().to_string(),
                    "-e",
                    &bpftrace_script(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            finish(child, tool)?
        }
        Config::Heaptrack => {
            if !installed("heaptrack") {
                return Ok(None);
            }
            let out = Command::new("heaptrack")
                .arg("-o")
                .arg(dir.join("heaptrack.out"))
                .arg(workload)
                .args([&n, "10"])
                .stderr(Stdio::null())
                .output()?;
            ns_per_pair(&String::from_utf8_lossy(&out.stdout))?
        }
    };
    Ok(Some(ns))
}

pub fn peers(tracer: &Path, dir: &Path, short: bool) -> Result<Value> {
    let root = root();
    let workload = dir.join("alloc-loop");
    let (rounds, n) = if short { (1, 20_000u64) } else { (5, 200_000) };
    let configs = [
        Config::Untraced,
        Config::MallocEntry,
        Config::MallocReturn,
        Config::MallocStack,
        Config::FreeEntry,
        Config::Floor,
        Config::RecordFp,
        Config::RecordDwarf,
        Config::Bpftrace,
        Config::Heaptrack,
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut skipped = vec![false; configs.len()];
    for round in 0..rounds {
        eprintln!("bench: peers, round {} of {rounds}", round + 1);
        for (i, c) in configs.iter().enumerate() {
            match measure(*c, tracer, &workload, dir, n)? {
                Some(ns) => samples[i].push(ns),
                None => skipped[i] = true,
            }
        }
    }
    let med: Vec<f64> = samples.iter().map(|s| median(s.iter().copied())).collect();
    let at = |c: Config| configs.iter().position(|x| *x == c).expect("measured");
    let (untraced, floor) = (med[at(Config::Untraced)], med[at(Config::Floor)]);
    println!();
    println!(
        "peers: alloc-loop, {n} malloc(16..4096)+free pairs 10 frames below main, median of \
         {rounds}, interleaved"
    );
    println!(
        "{:<40} {:>12} {:>18} {:>12} {:>10}",
        "configuration", "ns per pair", "min-max", "x untraced", "x floor"
    );
    let mut results = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        if skipped[i] {
            println!("{:<40} skipped: not installed", c.name());
            results.push(json!({"configuration": c.name(), "skipped": "not installed"}));
            continue;
        }
        let (lo, hi) = crate::bench::min_max(&samples[i]);
        println!(
            "{:<40} {:>12.0} {:>18} {:>11.1}x {:>9.2}x",
            c.name(),
            med[i],
            format!("{lo:.0}-{hi:.0}"),
            med[i] / untraced,
            med[i] / floor
        );
        results.push(json!({
            "configuration": c.name(),
            "ns_per_pair": samples[i],
            "median_ns_per_pair": med[i],
            "ratio_to_untraced": med[i] / untraced,
            "ratio_to_floor": med[i] / floor,
        }));
    }
    for row in [
        "libbpf-tools memleak",
        "libbpf-tools memleak, free probed later",
    ] {
        println!("{row:<40} skipped: {LIBBPF_TOOLS_SKIPPED}");
    }
    let (fp, bpftrace) = (at(Config::RecordFp), at(Config::Bpftrace));
    let fp_over_floor = med[fp] / floor;
    let bpftrace_over_fp =
        (!skipped[bpftrace]).then(|| (med[bpftrace] - untraced) / (med[fp] - untraced).max(1.0));
    println!();
    println!(
        "record fp is {fp_over_floor:.2}x the floor (goal: at most {FLOOR_GOAL}x){}",
        if fp_over_floor <= FLOOR_GOAL {
            ""
        } else {
            "  ABOVE GOAL"
        }
    );
    if let Some(r) = bpftrace_over_fp {
        println!(
            "the memleak-style bpftrace script adds {r:.1}x what record fp adds (goal: at least \
             {BPFTRACE_GOAL}x){}",
            if r >= BPFTRACE_GOAL {
                ""
            } else {
                "  BELOW GOAL"
            }
        );
    }

    let hold = dir.join("hold");
    let stacks = dir.join("stacks");
    for (out, src, flags) in [
        (&hold, "bench/hold.c", vec!["-O2", "-g"]),
        (
            &stacks,
            "bench/stacks.c",
            vec!["-O2", "-g", "-fno-omit-frame-pointer"],
        ),
    ] {
        run(Command::new("gcc")
            .args(&flags)
            .arg("-o")
            .arg(out)
            .arg(root.join(src)))?;
    }
    let held = if short { 100_000 } else { 1_000_000 };
    let memory = tracer_memory(tracer, &hold, held)?;
    println!();
    println!(
        "tracer memory with {held} outstanding allocations: user RSS {:.1} MiB, kernel maps {:.1} \
         MiB (of which the live-allocation map {:.1} MiB)",
        memory.rss as f64 / 1048576.0,
        memory.maps as f64 / 1048576.0,
        memory.allocs_map as f64 / 1048576.0
    );
    let distinct = 10_000;
    let (ctrl_c, exited) = ctrl_c_to_flamegraph(tracer, &stacks, dir, distinct)?;
    println!(
        "Ctrl-C to a written flamegraph with {distinct} distinct stacks: {ctrl_c:.2} s (goal: \
         under {CTRL_C_GOAL_SECS} s){}; to exit, every probe detached: {exited:.2} s",
        if ctrl_c < CTRL_C_GOAL_SECS {
            ""
        } else {
            "  ABOVE GOAL"
        }
    );
    Ok(json!({
        "workload": {"program": "bench/alloc-loop.c", "iterations": n, "depth": 10},
        "rounds": rounds,
        "results": results,
        "skipped": [format!("libbpf-tools memleak: {LIBBPF_TOOLS_SKIPPED}")],
        "record_fp_over_floor": fp_over_floor,
        "goal_record_fp_over_floor": FLOOR_GOAL,
        "bpftrace_added_over_record_fp_added": bpftrace_over_fp,
        "goal_bpftrace_added_over_record_fp_added": BPFTRACE_GOAL,
        "memory": {
            "outstanding_allocations": held,
            "user_rss_bytes": memory.rss,
            "kernel_map_bytes": memory.maps,
            "live_allocation_map_bytes": memory.allocs_map,
        },
        "ctrl_c_to_flamegraph_secs": ctrl_c,
        "ctrl_c_to_exit_secs": exited,
        "distinct_stacks": distinct,
    }))
}

struct Memory {
    rss: u64,
    maps: u64,
    allocs_map: u64,
}

/// bridge-trace's RSS and the memory of its BPF maps (the kernel's `memlock` figure per map
/// descriptor) while it traces `count` outstanding allocations.
fn tracer_memory(tracer: &Path, hold: &Path, count: u64) -> Result<Memory> {
    let mut target = Command::new(hold)
        .args([&count.to_string(), "1500"])
        .stdout(Stdio::piped())
        .spawn()?;
    let max_allocs = (count * 2).to_string();
    let mut t = Command::new(tracer)
        .args(["record", "--quiet", "--max-allocs", &max_allocs, "--pid"])
        .arg(target.id().to_string())
        .args(["-o", "/dev/null", "--format", "folded"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(target.stdout.take().unwrap()).read_line(&mut line)?;
    // Settled: every allocation recorded.
    std::thread::sleep(Duration::from_millis(500));
    let pid = t.id();
    let rss = crate::bench::rss_bytes(pid).unwrap_or(0);
    let maps = crate::bench::bpf_maps(pid)?;
    let total = maps.iter().map(|m| m.1).sum();
    let allocs_map = maps.iter().find(|m| m.0 == count * 2).map_or(0, |m| m.1);
    // SAFETY: plain syscalls on our own children.
    unsafe {
        libc::kill(pid as i32, libc::SIGINT);
    }
    let _ = t.wait();
    let _ = target.kill();
    let _ = target.wait();
    if rss == 0 {
        bail!("could not read bridge-trace's memory");
    }
    Ok(Memory {
        rss,
        maps: total,
        allocs_map,
    })
}

/// Seconds from SIGINT to the flamegraph written, and to bridge-trace's exit (every probe
/// detached), with `count` distinct stacks outstanding.
fn ctrl_c_to_flamegraph(
    tracer: &Path,
    stacks: &Path,
    dir: &Path,
    count: u64,
) -> Result<(f64, f64)> {
    let svg: PathBuf = dir.join("ctrl-c.svg");
    let _ = std::fs::remove_file(&svg);
    let mut t = Command::new(tracer)
        .args(["record", "--quiet", "-o"])
        .arg(&svg)
        .arg("--")
        .arg(stacks)
        .arg(count.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Its first line names the launched fixture: "tracing stacks (pid N) ...". (Neither pipe is
    // read to its end: the fixture, left running, holds them open.)
    let mut err = BufReader::new(t.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first)?;
    let fixture = first
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse::<i32>().ok())
        .with_context(|| format!("no pid in {first:?}"))?;
    let mut out = BufReader::new(t.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("leaked") {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("stacks ended early");
        }
    }
    let started = Instant::now();
    // SAFETY: plain syscalls on our own child and its child.
    unsafe {
        libc::kill(t.id() as i32, libc::SIGINT);
    }
    // Written (renamed into place whole) ...
    while !svg.exists() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = started.elapsed().as_secs_f64();
    // ... and, probes detached, bridge-trace gone.
    let status = t.wait()?;
    let exited = started.elapsed().as_secs_f64();
    unsafe {
        libc::kill(fixture, libc::SIGTERM);
    }
    let stderr = first;
    if !status.success() || !svg.exists() {
        bail!("record did not write {}: {status}\n{stderr}", svg.display());
    }
    Ok((secs, exited))
}
