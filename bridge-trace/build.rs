//! Builds the kernel half (`bridge-trace-ebpf`) for `bpfel-unknown-none` with aya-build, so that
//! `cargo build` of the user half always embeds an up-to-date eBPF object.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // The nested cargo (and the `rustc -` it runs to learn about the target) inherits this
    // process's stdin; whatever that is under the outer build, it must read nothing from it. A
    // build that fed it another process's output failed with "unknown start of token".
    let null = std::fs::File::open("/dev/null").context("opening /dev/null")?;
    // SAFETY: plain syscall; fd 0 is replaced by a descriptor of /dev/null.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) } < 0 {
        anyhow::bail!("redirecting stdin: {}", std::io::Error::last_os_error());
    }
    // Nor does it share the outer build's jobserver, whose descriptors it may not hold.
    for var in ["CARGO_MAKEFLAGS", "MAKEFLAGS", "MFLAGS"] {
        // SAFETY: single-threaded at this point: nothing else reads the environment.
        unsafe { std::env::remove_var(var) };
    }
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
