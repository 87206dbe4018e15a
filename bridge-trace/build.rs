//! Builds the kernel half (`bridge-trace-ebpf`) for `bpfel-unknown-none` with aya-build, so that
//! `cargo build` of the user half always embeds an up-to-date eBPF object.
use std::path::Path;

use anyhow::Context as _;

/// Attempts at the nested build.
const ATTEMPTS: u32 = 3;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../bridge-trace-ebpf");
    println!("cargo:rerun-if-changed=../bridge-trace-common/src");
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    let mut attempt = 1;
    loop {
        let built = aya_build::build_ebpf(
            [aya_build::Package {
                name: "bridge-trace-ebpf",
                root_dir: root,
                ..Default::default()
            }],
            aya_build::Toolchain::default(),
        );
        match built {
            Ok(()) => return Ok(()),
            // In a first build from a fresh clone, the nested cargo's probe of rustc ("failed to
            // run `rustc` to learn about target-specific information") has been seen to read
            // the output of compilers running beside it in the outer build, and fail, and the
            // failure is cached: forget the probe's cache and build again.
            Err(e) if attempt < ATTEMPTS => {
                println!("cargo:warning=the eBPF build failed ({e}); trying again");
                forget_rustc_info(&Path::new(&out_dir).join("aya-build"), 3);
                std::thread::sleep(std::time::Duration::from_secs(2));
                attempt += 1;
            }
            Err(e) => {
                return Err(e).context(
                    "building the eBPF object (run `cargo xtask setup` to install bpf-linker \
                     and rust-src)",
                )
            }
        }
    }
}

/// Removes every `.rustc_info.json` (cargo's cache of its rustc probes) under `dir`, looking
/// `depth` levels down (it sits at `aya-build/target/<package>/`).
fn forget_rustc_info(dir: &Path, depth: u32) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == ".rustc_info.json") {
            let _ = std::fs::remove_file(&path);
        } else if depth > 0 && entry.file_type().is_ok_and(|t| t.is_dir()) {
            forget_rustc_info(&path, depth - 1);
        }
    }
}
