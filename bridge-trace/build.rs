//! Builds the two objects the `bridge-trace` binary carries: the kernel half
//! (`bridge-trace-ebpf`) for `bpfel-unknown-none` with aya-build, and the preloadable sampler
//! (`bridge-trace-sampler`, `libbridge_trace_sampler.so`) in release with `panic = abort`, so
//! that `cargo build` of the user half always embeds up-to-date copies of both.
use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../bridge-trace-ebpf");
    println!("cargo:rerun-if-changed=../bridge-trace-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "bridge-trace-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF object (run `cargo xtask setup` to install bpf-linker and rust-src)",
    )?;
    build_sampler()
}

/// `cargo build --release -p bridge-trace-sampler` into a target directory of its own (the
/// outer build holds the workspace's), with `panic = abort`: a panic in a library inside
/// another program's malloc must end in an abort, never unwind into C.
fn build_sampler() -> anyhow::Result<()> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../bridge-trace-sampler");
    println!("cargo:rerun-if-changed={manifest}/src");
    println!("cargo:rerun-if-changed={manifest}/Cargo.toml");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out.join("sampler");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "bridge-trace-sampler",
        ])
        .arg("--manifest-path")
        .arg(format!("{manifest}/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--config", "profile.release.panic=\"abort\""])
        // The outer build's flags are for the binary, not for a library other programs load.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .status()
        .context("running cargo for the sampler")?;
    if !status.success() {
        bail!("building bridge-trace-sampler failed ({status})");
    }
    let lib = target_dir.join("release/libbridge_trace_sampler.so");
    std::fs::copy(&lib, out.join("libbridge_trace_sampler.so"))
        .with_context(|| format!("copying {}", lib.display()))?;
    Ok(())
}
