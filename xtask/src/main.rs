//! Project tasks: `cargo xtask setup | demo | bench | test`.
//!
//! `setup` installs, idempotently, what building and testing need on a fresh machine: rust-src
//! for the nightly toolchain, bpf-linker linked against the nightly toolchain's own LLVM (the
//! system llvm-config is too old), and the Debian packages (a C compiler for the demo and the
//! fixtures, libc debug symbols, bpftool). `demo` and `test` run it first.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod inject;
mod peers;
mod soak;
mod survey;
mod tiers;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and packages the project needs (idempotent).
    Setup,
    /// Build, launch the bundled data-bridge demo under `bridge-trace record`, write leaks.svg.
    Demo {
        /// Messages the demo moves before it shuts down.
        #[arg(long, default_value_t = 20_000)]
        messages: u64,
    },
    /// Measure what tracing costs the traced program (results in target/bench/).
    Bench {
        /// One quick round with fewer iterations: proves the benchmark still runs.
        #[arg(long)]
        short: bool,
        /// Only the `watch` tiers part (the sampler, the uprobe tiers, heaptrack, injection).
        #[arg(long)]
        watch_only: bool,
        /// Only the injection part (stop times, exact tracing through the injected sampler).
        #[arg(long, conflicts_with = "watch_only")]
        inject_only: bool,
        /// Also measure `record` as built from this git revision, interleaved with this tree's
        /// (the cost per malloc+free pair before and after a change, in the same run).
        #[arg(long, value_name = "REV")]
        against: Option<String>,
        /// Rounds of the interleaved `record` rows (default 5; 1 with --short).
        #[arg(long, value_name = "N")]
        rounds: Option<usize>,
    },
    /// Run `watch` against the data bridge for a long time and check that the tracer's memory
    /// stays bounded (results in target/bench/soak.json).
    Soak {
        /// How long.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Fuzz every parser of user and file input for a bounded time (fuzz/, cargo-fuzz).
    Fuzz {
        /// Time per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run every test, unit and integration, with real eBPF.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

const BPF_LINKER_VERSION: &str = "0.13.0";
/// gcc and g++ build the fixtures, libc6-dbg gives glibc's frames names, gdb checks our stacks, and
/// python3.11 is a real program built without frame pointers (Debian's, as shipped),
/// prometheus scrapes `watch` in a test, golang-go brings `go tool pprof` (and builds a Go
/// program bridge-trace must refuse), chromium (with a font) opens the SVG and HTML reports in a
/// test, jemalloc, mimalloc and tcmalloc are the allocators the fixtures are built against (make
/// builds tikv-jemallocator's jemalloc for the Rust one), and bpftrace and heaptrack are the peers
/// `cargo xtask bench` measures bridge-trace against; systemtap-sdt-dev's `<sys/sdt.h>` writes
/// the otel_memory probes of the fixture that carries the contract without bridge-trace's
/// sampler.
const APT_PACKAGES: &[&str] = &[
    "gcc",
    "g++",
    "libc6-dev",
    "libc6-dbg",
    "bpftool",
    "util-linux",
    "gdb",
    "python3.11",
    "prometheus",
    "golang-go",
    "chromium",
    "fonts-dejavu-core",
    "libjemalloc-dev",
    "libmimalloc-dev",
    "libgoogle-perftools-dev",
    "make",
    "bpftrace",
    "heaptrack",
    "systemtap-sdt-dev",
    // systemd-analyze, which verifies deploy/'s unit (tests/deploy.rs).
    "systemd",
    // The debuginfod server tests/debuginfod.rs serves a stripped fixture's debug file from;
    // objcopy and strip, which make the two halves.
    "debuginfod",
    "binutils",
];

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Demo { messages } => {
            setup()?;
            demo(messages)
        }
        Task::Bench {
            short,
            watch_only,
            inject_only,
            against,
            rounds,
        } => {
            setup()?;
            bench::bench(short, watch_only, inject_only, against.as_deref(), rounds)
        }
        Task::Fuzz { seconds } => {
            setup()?;
            fuzz::fuzz(seconds)
        }
        Task::Soak { minutes } => {
            setup()?;
            soak::soak(minutes)
        }
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs `cmd` to completion; nothing it starts reads this process's stdin.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> Result<()> {
    dev_null_is_the_null_device()?;
    rust_src()?;
    bpf_linker()?;
    apt_packages()?;
    tracefs()?;
    Ok(())
}

/// tracefs at /sys/kernel/tracing: `--follow-children` reads the task_newtask event's format
/// there. A fresh machine may boot without it mounted.
fn tracefs() -> Result<()> {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").is_dir() {
        return Ok(());
    }
    eprintln!("setup: mounting tracefs at {}", dir.display());
    run(Command::new("mount")
        .args(["-t", "tracefs", "nodev"])
        .arg(dir))
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed to build the eBPF object")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

/// bpf-linker, linked against the nightly toolchain's own libLLVM.
fn bpf_linker() -> Result<()> {
    let bin = cargo_home().join("bin/bpf-linker");
    if let Ok(v) = output(Command::new(&bin).arg("--version")) {
        if v.trim() == format!("bpf-linker {BPF_LINKER_VERSION}") {
            return Ok(());
        }
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" → 22
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let prefix = PathBuf::from(env::var_os("HOME").unwrap_or_default())
        .join(".cache/bridge-trace/llvm")
        .join(&llvm);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let copy = prefix_lib.join(&llvm);
    if !copy.exists() {
        std::fs::copy(lib_dir.join(&llvm), &copy)?;
    }
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    run(Command::new("cargo").env("LLVM_PREFIX", &prefix).args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--force",
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
    ]))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let sudo = !is_root();
    let apt = |args: &[&str]| {
        let mut c = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

/// Checks that `/dev/null` is the null device. Builds lean on it: build scripts send their
/// probes' diagnostics there and cargo's probe of rustc reads its source from it, so a regular
/// file at `/dev/null` (left by anything that renamed a file over it) fails every first build
/// with "unknown start of token" in a nested cargo.
fn dev_null_is_the_null_device() -> Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let kind = std::fs::symlink_metadata("/dev/null")
        .context("reading /dev/null")?
        .file_type();
    if !kind.is_char_device() {
        bail!(
            "/dev/null is not the null device (something replaced it with a file); \
             restore it with: rm /dev/null && mknod -m 666 /dev/null c 1 3"
        );
    }
    Ok(())
}

/// Builds the release bridge-trace binary; returns its path.
fn build_release() -> Result<PathBuf> {
    let root = root();
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "bridge-trace",
    ]))?;
    Ok(root.join("target/release/bridge-trace"))
}

fn demo(messages: u64) -> Result<()> {
    let root = root();
    let tracer = build_release()?;
    let demo_dir = root.join("target/demo");
    std::fs::create_dir_all(&demo_dir)?;
    let demo_bin = demo_dir.join("data-bridge");
    run(Command::new("gcc")
        .args([
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-pthread",
            "-o",
        ])
        .arg(&demo_bin)
        .arg(root.join("demo/data-bridge.c")))?;
    let truth = demo_dir.join("truth.txt");
    let _ = std::fs::remove_file(&truth);
    let mut cmd = if is_root() {
        Command::new(&tracer)
    } else {
        let mut c = Command::new("sudo");
        c.arg(&tracer);
        c
    };
    cmd.current_dir(&root)
        .args([
            "record",
            "--quiet",
            "-o",
            "leaks.svg",
            "-o",
            "leaks.folded",
            "-o",
            "leaks.txt",
            "-o",
            "leaks.json",
            "-o",
            "leaks.pb.gz",
            "-o",
            "leaks.html",
            "--",
        ])
        .arg(&demo_bin)
        .args([
            "--messages",
            &messages.to_string(),
            "--rate",
            "4000",
            "--truth",
        ])
        .arg(&truth);
    eprintln!("demo: recording the data bridge ({messages} messages at 4000/s)");
    run(&mut cmd)?;

    // Compare with what the demo says it leaked.
    let truth_text = std::fs::read_to_string(&truth).context("the demo wrote no truth file")?;
    let mut fields = truth_text.split_whitespace();
    let (site, bytes) = (
        fields.next().unwrap_or_default().to_string(),
        fields.next().unwrap_or_default().parse::<u64>()?,
    );
    let folded = std::fs::read_to_string(root.join("leaks.folded"))?;
    let mut by_leaf: std::collections::BTreeMap<String, u64> = Default::default();
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let leaf = stack.rsplit(';').next().unwrap_or(stack).to_string();
        *by_leaf.entry(leaf).or_default() += n.parse::<u64>()?;
    }
    let widest = by_leaf
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(l, n)| (l.clone(), *n))
        .unwrap_or_default();
    println!();
    println!("demo: the data bridge says it leaked {bytes} bytes at {site}");
    println!(
        "demo: widest leaf of the flamegraph: {} with {} bytes",
        widest.0, widest.1
    );
    println!("demo: open {}", root.join("leaks.svg").display());
    if widest != (site.clone(), bytes) {
        bail!("the flamegraph's widest leaf does not match the demo's own account");
    }
    println!("demo: they match.");
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let root = root();
    let mut child = Command::new("cargo")
        .current_dir(&root)
        .args(["test", "--workspace", "--exclude", "bridge-trace-ebpf"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Pass the output through, adding up every test binary's "test result:" line.
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.trim_start_matches("ok. ").parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}
