//! `cargo xtask soak`: `watch --tier full` against the bundled data bridge at a high allocation
//! rate for a long run (10 minutes unless told otherwise), snapshots to an `--out-dir` every
//! minute, and the tracer's own memory sampled every 30 s: its RSS, and its BPF maps' memory
//! (the kernel's `memlock` figure per map descriptor). The maps are allocated whole at load, so
//! their figure is the bound; the RSS must level off once every distinct stack and symbol has
//! been seen (no leak in the tracer itself). Results go to `target/bench/soak.json`.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::{
    bench::{bpf_maps, build_demo, rss_bytes, Killed},
    build_release, root,
};

/// Messages a second: about 9 allocations each, some leaked.
const RATE: u32 = 20_000;

/// How much higher the RSS may peak in the second half of the run than in the first, at most:
/// 10 %, and 4 MiB for the allocator's own slack. (Peaks, not points: the RSS is a sawtooth,
/// each window's work allocated and released.)
const GROWTH_ALLOWED: f64 = 0.10;
const SLACK_BYTES: u64 = 4 << 20;

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

pub fn soak(minutes: u64) -> Result<()> {
    let tracer = build_release()?;
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let demo = build_demo(&dir)?;
    let out_dir = dir.join("soak-snapshots");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;

    let service = Killed(
        Command::new(&demo)
            .args(["--rate", &RATE.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the data bridge")?,
    );
    let watch = Killed(
        Command::new(&tracer)
            .args(["watch", "--pid", &service.0.id().to_string()])
            .args(["--tier", "full", "--fixed-tier", "--max-overhead", "off"])
            .args(["--interval", "10s", "--snapshot-every", "1m", "--keep", "3"])
            .arg("--out-dir")
            .arg(&out_dir)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting watch")?,
    );
    let pid = watch.0.id();
    let total = Duration::from_secs(minutes * 60);
    let started = Instant::now();
    let mut samples = Vec::new();
    println!("soak: watch --tier full on the data bridge at {RATE} messages/s for {minutes} min");
    println!(
        "{:>8} {:>12} {:>14} {:>10}",
        "minutes", "RSS MiB", "BPF maps MiB", "snapshots"
    );
    loop {
        std::thread::sleep(Duration::from_secs(30));
        if !alive(pid) {
            bail!("watch exited during the soak");
        }
        if !alive(service.0.id()) {
            bail!("the data bridge died during the soak");
        }
        let elapsed = started.elapsed();
        let (r, m) = (
            rss_bytes(pid)?,
            bpf_maps(pid)?.iter().map(|m| m.1).sum::<u64>(),
        );
        let snapshots = std::fs::read_dir(&out_dir)?.count();
        println!(
            "{:>8.1} {:>12.1} {:>14.1} {:>10}",
            elapsed.as_secs_f64() / 60.0,
            r as f64 / 1048576.0,
            m as f64 / 1048576.0,
            snapshots
        );
        samples.push((elapsed.as_secs_f64(), r, m));
        if elapsed >= total {
            break;
        }
    }
    drop(watch);
    drop(service);

    let half = samples.len() / 2;
    let peak = |s: &[(f64, u64, u64)]| s.iter().map(|x| x.1).max().unwrap_or(0);
    let (first_peak, second_peak) = (peak(&samples[..half]), peak(&samples[half..]));
    let maps = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let allowed = (first_peak as f64 * (1.0 + GROWTH_ALLOWED)) as u64 + SLACK_BYTES;
    let bounded = second_peak <= allowed && samples.iter().all(|s| s.2 == samples[0].2);
    println!(
        "tracer memory: RSS peak {:.1} MiB in the first half, {:.1} MiB in the second (allowed \
         {:.1}), BPF maps {:.1} MiB, fixed at load: {}",
        first_peak as f64 / 1048576.0,
        second_peak as f64 / 1048576.0,
        allowed as f64 / 1048576.0,
        maps as f64 / 1048576.0,
        if bounded { "bounded" } else { "GROWING" }
    );
    let result = json!({
        "rate_messages_per_sec": RATE,
        "minutes": minutes,
        "samples": samples.iter().map(|(t, r, m)| json!({"secs": t, "rss_bytes": r, "map_bytes": m})).collect::<Vec<_>>(),
        "rss_peak_first_half_bytes": first_peak,
        "rss_peak_second_half_bytes": second_peak,
        "map_bytes": maps,
        "bounded": bounded,
    });
    let path = dir.join("soak.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
    eprintln!("soak: wrote {}", path.display());
    if !bounded {
        bail!("the tracer's memory kept growing");
    }
    Ok(())
}
