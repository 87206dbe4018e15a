//! Builds the kernel half (`bridge-trace-ebpf`) for `bpfel-unknown-none` with aya-build, so that
//! `cargo build` of the user half always embeds an up-to-date eBPF object.
use anyhow::Context as _;

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
    )
}
