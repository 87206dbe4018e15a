//! `cargo xtask fuzz [--seconds N]`: every fuzz target of `fuzz/` (cargo-fuzz, libFuzzer, the
//! nightly toolchain's sanitizers) for a bounded time each; cargo-fuzz is installed first when
//! missing. Not part of `cargo xtask test`: a crash it finds is fixed and its input kept as a
//! regression test in the crate whose parser it broke.
use std::process::Command;

use anyhow::{bail, Result};

use crate::{output, root, run};

/// Seeds the capture target with the version-1 fixture, whole and as the JSON behind its
/// header (which the target wraps in a valid header, so that mutations reach the parser).
fn seed_captures(dir: &std::path::Path) -> Result<()> {
    let corpus = dir.join("corpus/capture");
    std::fs::create_dir_all(&corpus)?;
    let fixture = root().join("tests/data/capture-v1.btcap");
    std::fs::copy(&fixture, corpus.join("seed-v1.btcap"))?;
    run(Command::new("sh").arg("-c").arg(format!(
        "tail -c +13 '{}' | gzip -dc > '{}'",
        fixture.display(),
        corpus.join("seed-v1.json").display()
    )))
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";
const TARGETS: [&str; 6] = [
    "durations",
    "sizes",
    "maps",
    "placement",
    "folded",
    "capture",
];

pub fn fuzz(seconds: u64) -> Result<()> {
    let installed = output(Command::new("cargo").args(["fuzz", "--version"])).is_ok();
    if !installed {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
    }
    let dir = root().join("fuzz");
    seed_captures(&dir)?;
    let mut failed = Vec::new();
    for target in TARGETS {
        eprintln!("fuzz: {target}, {seconds} s");
        let status = Command::new("rustup")
            .current_dir(&dir)
            .args(["run", "nightly", "cargo", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .stdin(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets that crashed (inputs under fuzz/artifacts/): {failed:?}");
    }
    eprintln!(
        "fuzz: {} targets, {seconds} s each, no crash",
        TARGETS.len()
    );
    Ok(())
}
