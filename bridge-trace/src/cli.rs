//! Command-line arguments (raw, as clap parses them) and the validated [`Config`] built from them.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use bridge_trace_common::DEFAULT_MAX_ALLOCS;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};

#[derive(Debug, Parser)]
#[command(
    name = "bridge-trace",
    version,
    about = "eBPF allocation tracer: flamegraphs of the memory a running process never frees"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace a process's allocations and report those still outstanding when recording stops.
    Record(RecordArgs),
    /// Watch running services continuously, inside an overhead budget: classify call sites as
    /// leaking, cache or churn window after window, export Prometheus metrics and pprof
    /// snapshots, and say when a site leaks.
    Watch(Box<WatchArgs>),
    /// A live view of a running process's call sites by memory held and growth, refreshed
    /// every window (what `watch` sees, in the terminal).
    Top(TopArgs),
    /// Compare two reports of a service (before and after an update, or an hour apart): a
    /// differential flamegraph, red where more is held than before, and the call sites that
    /// grew most. Reads raw captures, folded stacks or bridge-trace's JSON reports; needs no
    /// root.
    Diff(DiffArgs),
    /// Render a raw capture (the `.btcap` that `record` writes beside its outputs) again, on
    /// any machine and without root: frames are named from this machine's files when their
    /// build-ids match, else from --debug-dir.
    Report(ReportArgs),
    /// The benchmark's floor: empty probes on malloc and free (hidden; `cargo xtask bench`).
    #[command(hide = true)]
    Floor(FloorArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    bridge-trace report leaks.btcap -o leaks.html\n  \
    bridge-trace report leaks.btcap --debug-dir ./symbols -o leaks.svg -o leaks.pb.gz")]
pub struct ReportArgs {
    /// The raw capture.
    pub capture: PathBuf,
    /// Where to write; repeat for several formats, each by its extension (.svg, .folded, .json,
    /// .txt, .pb.gz, .html) unless --format is given. `-` is standard output. Default: the
    /// text report on standard output.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Vec<PathBuf>,
    /// Format of the (single) output, overriding its extension.
    #[arg(long, short = 'f', value_enum)]
    pub format: Option<Format>,
    /// A directory holding the traced binaries or their debug files: by build-id
    /// (`.build-id/ab/cdef….debug`), by their path below it, or by file name. Repeatable;
    /// searched before this machine's own files and /usr/lib/debug.
    #[arg(long, value_name = "DIR")]
    pub debug_dir: Vec<PathBuf>,
    /// How many call stacks the text report lists.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// Permissions of the files written, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    pub mode: String,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The earlier recording: a raw capture (.btcap), folded stacks, or bridge-trace's .json.
    pub before: PathBuf,
    /// The later report.
    pub after: PathBuf,
    /// Where to write, by extension: .svg (differential flamegraph), .folded (`stack BEFORE
    /// AFTER` lines), .txt (the table of sites); repeatable. The table also goes to stdout.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Vec<PathBuf>,
    /// How many call sites the table lists.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// Permissions of the files written, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    pub mode: String,
}

#[derive(Debug, Args)]
pub struct FloorArgs {
    /// The process to attach the floor's probes to, until it exits or Ctrl-C.
    #[arg(long, short = 'p', value_name = "PID")]
    pub pid: u32,
    /// Which of the floor's probes: one part alone, or all of them.
    #[arg(long, value_enum, default_value = "all")]
    pub parts: FloorParts,
}

/// The parts of the benchmark's floor, each measured alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FloorParts {
    /// An empty probe on malloc (where bridge-trace places it).
    MallocEntry,
    /// An empty probe and an empty return probe on malloc.
    MallocReturn,
    /// The same, the return probe capturing the user stack.
    MallocStack,
    /// An empty probe on free's first instruction (single-stepped by glibc's free).
    FreeEntry,
    /// The floor: malloc's entry, return and stack, and free where bridge-trace probes it.
    All,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The process to look at.
    #[arg(long, short = 'p', value_name = "PID")]
    pub pid: u32,
    /// How often the view is refreshed (one window).
    #[arg(long, short = 'i', value_name = "DURATION", default_value = "2s")]
    pub interval: String,
    /// Stop after this long (default: until Ctrl-C or the process exits).
    #[arg(long, short = 'd', value_name = "DURATION")]
    pub duration: Option<String>,
    /// Rows shown.
    #[arg(long, value_name = "N", default_value_t = 15)]
    pub rows: usize,
    /// How to walk stacks (see `record --help`).
    #[arg(long, value_enum, default_value_t = Unwind::Auto)]
    pub unwind: Unwind,
}

#[derive(Debug, Args)]
#[command(after_help = "Tiers (--tier), cheapest first:\n  \
    growth   heap growth only (brk, anonymous mmap/munmap/mremap, first-touch page faults), with\n           \
    stacks; when the heap keeps growing, steps up to sampled until the leaking site is named\n  \
    sampled  one allocation in about every --sample-interval bytes, estimates scaled back\n  \
    full     every allocation and free, as record does\n\
    Over --max-overhead the sampling interval grows or the tier steps down; each change is\n\
    logged and exported (bridge_trace_tier, bridge_trace_overhead_cpus).\n\n\
    Examples:\n  \
    sudo bridge-trace watch --pid 1234 --interval 30s --alert-growth 1MiB/min\n  \
    sudo bridge-trace watch --exe /usr/bin/data-bridge --out-dir /var/lib/bridge-trace \\\n      \
    --push http://pyroscope:4040")]
pub struct WatchArgs {
    /// The process to watch.
    #[arg(long, short = 'p', value_name = "PID", conflicts_with = "exe")]
    pub pid: Option<u32>,
    /// Watch the process running this executable, and the next one when it exits (a service
    /// that restarts).
    #[arg(long, value_name = "PATH")]
    pub exe: Option<PathBuf>,
    /// Length of one window: outstanding memory is sampled per call site at each.
    #[arg(long, short = 'i', value_name = "DURATION", default_value = "10s")]
    pub interval: String,
    /// Stop after this long (default: until Ctrl-C or SIGTERM, or with --pid the process's
    /// exit).
    #[arg(long, short = 'd', value_name = "DURATION")]
    pub duration: Option<String>,
    /// Where to serve Prometheus metrics (GET /metrics).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9464")]
    pub metrics_addr: std::net::SocketAddr,
    /// Log an alert when a leaking site grows faster than this (e.g. 64KiB/s, 10MB/min).
    #[arg(long, value_name = "RATE")]
    pub alert_growth: Option<String>,
    /// How much of the recent history --alert-growth measures the growth over.
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub alert_window: String,
    /// Shell command run (`sh -c`) when a site starts leaking or passes --alert-growth, with
    /// BRIDGE_TRACE_SITE, BRIDGE_TRACE_REASON, BRIDGE_TRACE_PID and BRIDGE_TRACE_BUNDLE (with
    /// --out-dir) set.
    #[arg(long, value_name = "CMD")]
    pub on_alert: Option<String>,
    /// Directory for snapshots (every --snapshot-every) and incident bundles (at each alert):
    /// flamegraph, folded stacks, pprof, JSON and text report.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// How often a snapshot is written to --out-dir.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub snapshot_every: String,
    /// Snapshots kept in --out-dir (the oldest go first; incident bundles are kept).
    #[arg(long, value_name = "N", default_value_t = 24)]
    pub keep: usize,
    /// Largest total size of the snapshots kept in --out-dir (the oldest go first).
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    pub keep_size: String,
    /// Permissions of the files written to --out-dir, in octal (directories also searchable).
    /// Under sudo they belong to the invoking user.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    pub mode: String,
    /// Overhead tier to start in (see the tiers above); --max-overhead may change it.
    #[arg(long, value_enum, default_value_t = Tier::Growth)]
    pub tier: Tier,
    /// Mean bytes allocated between two sampled allocations, in the sampled tier (e.g. 512KiB,
    /// 64KiB): smaller sees smaller leaks sooner and costs more.
    #[arg(long, value_name = "SIZE", default_value = "512KiB")]
    pub sample_interval: String,
    /// Overhead budget, in percent of one CPU (e.g. 1%, 0.5%), or `off`. The cost of the
    /// probes is measured every window; over budget, the sampling interval grows or the tier
    /// steps down, and every change is logged and exported.
    #[arg(long, value_name = "PERCENT", default_value = "1%")]
    pub max_overhead: String,
    /// Stay in --tier whatever happens: no stepping up to name a leak, nor down for the budget.
    #[arg(long)]
    pub fixed_tier: bool,
    /// Push each snapshot, as pprof, to a Pyroscope-compatible ingest endpoint (e.g.
    /// http://pyroscope:4040).
    #[arg(long, value_name = "URL")]
    pub push: Option<String>,
    /// Capacity of the kernel's live-allocation map.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ALLOCS)]
    pub max_allocs: u32,
    /// How to walk stacks (see `record --help`).
    #[arg(long, value_enum, default_value_t = Unwind::Auto)]
    pub unwind: Unwind,
}

/// How much `watch` traces (and costs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Tier {
    /// Heap growth only (brk, anonymous mmap/munmap/mremap, first-touch page faults), with
    /// stacks: no allocator probes, the cheapest.
    Growth,
    /// Allocations sampled by bytes (one per --sample-interval on average), estimates scaled
    /// back.
    Sampled,
    /// Every allocation and free, with its stack, as `record` does.
    Full,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Growth => "growth",
            Tier::Sampled => "sampled",
            Tier::Full => "full",
        }
    }
}

/// What to trace and how, for the stages that `record` and `watch` share.
#[derive(Clone, Copy, Debug)]
pub struct TraceOptions {
    pub max_allocs: u32,
    pub unwind: Unwind,
}

/// A validated `watch` request.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub target: WatchTarget,
    pub interval: Duration,
    pub duration: Option<Duration>,
    /// None: no metrics served (`top`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `top`: rows of the live view printed every window.
    pub view_rows: Option<usize>,
    /// Bytes per second.
    pub alert_growth: Option<f64>,
    pub alert_window: Duration,
    pub on_alert: Option<String>,
    pub out_dir: Option<PathBuf>,
    pub snapshot_every: Duration,
    pub keep: usize,
    pub keep_size: u64,
    /// Permissions of the files written to `out_dir`.
    pub mode: u32,
    pub tier: Tier,
    /// Mean bytes between sampled allocations (sampled tier).
    pub sample_interval: u64,
    /// Overhead budget in CPUs (0.01 = 1 % of one CPU); None: no budget.
    pub max_overhead: Option<f64>,
    /// Never change tier.
    pub fixed_tier: bool,
    /// Pyroscope-compatible base URL snapshots are pushed to.
    pub push: Option<String>,
    pub trace: TraceOptions,
}

/// What `watch` follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchTarget {
    Pid(u32),
    /// The process running this executable (canonical path), and its successors.
    Exe(PathBuf),
}

impl WatchConfig {
    pub fn from_watch_args(args: WatchArgs) -> Result<WatchConfig> {
        let target = match (args.pid, args.exe) {
            (Some(0), _) => return Err(Error::Usage("--pid 0 is not a process".into())),
            (Some(pid), None) => WatchTarget::Pid(pid),
            (None, Some(exe)) => WatchTarget::Exe(
                exe.canonicalize()
                    .map_err(|e| Error::Usage(format!("--exe {}: {e}", exe.display())))?,
            ),
            _ => return Err(Error::Usage("give --pid PID or --exe PATH".into())),
        };
        let interval = parse_duration("--interval", &args.interval)?;
        if interval < Duration::from_millis(100) {
            return Err(Error::Usage("--interval must be at least 100ms".into()));
        }
        let duration = args
            .duration
            .as_deref()
            .map(|d| parse_duration("--duration", d))
            .transpose()?;
        if args.max_allocs == 0 {
            return Err(Error::Usage("--max-allocs must be at least 1".into()));
        }
        Ok(WatchConfig {
            target,
            interval,
            duration,
            metrics_addr: Some(args.metrics_addr),
            view_rows: None,
            alert_growth: args
                .alert_growth
                .as_deref()
                .map(|r| parse_rate("--alert-growth", r))
                .transpose()?,
            alert_window: parse_duration("--alert-window", &args.alert_window)?,
            on_alert: args.on_alert,
            out_dir: match args.out_dir {
                Some(dir) => {
                    check_dir(&dir)?;
                    Some(dir)
                }
                None => None,
            },
            snapshot_every: parse_duration("--snapshot-every", &args.snapshot_every)?,
            keep: args.keep.max(1),
            keep_size: parse_size("--keep-size", &args.keep_size)?,
            mode: parse_mode(&args.mode)?,
            tier: args.tier,
            sample_interval: {
                let v = parse_size("--sample-interval", &args.sample_interval)?;
                if v == 0 || v > bridge_trace_common::MAX_SAMPLE_INTERVAL {
                    return Err(Error::Usage(
                        "--sample-interval must be between 1B and 1TiB".into(),
                    ));
                }
                v
            },
            max_overhead: parse_budget(&args.max_overhead)?,
            fixed_tier: args.fixed_tier,
            push: match args.push {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                    Some(url.trim_end_matches('/').to_string())
                }
                Some(url) => {
                    return Err(Error::Usage(format!(
                        "--push {url}: give an http:// or https:// URL"
                    )))
                }
                None => None,
            },
            trace: TraceOptions {
                max_allocs: args.max_allocs,
                unwind: args.unwind,
            },
        })
    }
}

impl WatchConfig {
    /// `top`: a watch without metrics or alerts, printing its view every window.
    pub fn from_top_args(args: TopArgs) -> Result<WatchConfig> {
        let watch = WatchArgs {
            pid: Some(args.pid),
            exe: None,
            interval: args.interval,
            duration: args.duration,
            metrics_addr: ([127, 0, 0, 1], 0).into(),
            alert_growth: None,
            alert_window: "5m".into(),
            on_alert: None,
            out_dir: None,
            snapshot_every: "10m".into(),
            keep: 1,
            keep_size: "1GiB".into(),
            mode: "600".into(),
            tier: Tier::Full,
            sample_interval: "512KiB".into(),
            max_overhead: "off".into(),
            fixed_tier: true,
            push: None,
            max_allocs: DEFAULT_MAX_ALLOCS,
            unwind: args.unwind,
        };
        Ok(WatchConfig {
            metrics_addr: None,
            view_rows: Some(args.rows.max(1)),
            ..WatchConfig::from_watch_args(watch)?
        })
    }
}

/// Fails unless `dir` is an existing, writable directory.
fn check_dir(dir: &Path) -> Result<()> {
    let err = |reason: &str| Error::Output {
        path: dir.to_path_buf(),
        reason: reason.to_string(),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(err("not a directory")),
        Err(_) => return Err(err("no such directory")),
    }
    tempfile::tempfile_in(dir)
        .map(drop)
        .map_err(|e| err(&format!("not writable: {e}")))
}

/// A size such as `512KiB`, `4MB` or `100` (bytes), as a number of bytes.
fn size_bytes(size: &str) -> std::result::Result<f64, &'static str> {
    let size = size.trim();
    let split = size
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(size.len());
    let (number, unit) = size.split_at(split);
    let number: f64 = number.parse().map_err(|_| "no number")?;
    let unit = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" | "K" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err("unknown unit"),
    };
    Ok(number * unit)
}

/// Parses a size such as `512KiB`, `64K`, `1MB` or `4096` into bytes.
pub fn parse_size(flag: &'static str, value: &str) -> Result<u64> {
    match size_bytes(value) {
        Ok(v) if (0.0..1.8e19).contains(&v) => Ok(v.round() as u64),
        Ok(_) => Err(Error::Usage(format!(
            "invalid size '{value}' for {flag}: too large"
        ))),
        Err(reason) => Err(Error::Usage(format!(
            "invalid size '{value}' for {flag}: {reason} (examples: 512KiB, 64K, 1MB)"
        ))),
    }
}

/// Parses `--max-overhead`: a percentage of one CPU (`1%`, `0.5%`), or `off`.
pub fn parse_budget(value: &str) -> Result<Option<f64>> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let bad = || {
        Error::Usage(format!(
            "invalid --max-overhead '{value}': give a percentage of one CPU such as 1% or \
             0.5%, or off"
        ))
    };
    let pct: f64 = v
        .strip_suffix('%')
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if !(pct > 0.0 && pct <= 100.0) {
        return Err(bad());
    }
    Ok(Some(pct / 100.0))
}

/// Parses a growth rate such as `64KiB/s`, `10MB/min`, `1GiB/h` into bytes per second; a bare
/// size is per second.
pub fn parse_rate(flag: &'static str, value: &str) -> Result<f64> {
    let bad = |reason: &str| {
        Error::Usage(format!(
            "invalid rate '{value}' for {flag}: {reason} (examples: 64KiB/s, 10MB/min, 1GiB/h)"
        ))
    };
    let (size, per) = match value.trim().split_once('/') {
        Some((size, per)) => (size.trim(), per.trim()),
        None => (value.trim(), "s"),
    };
    let seconds = match per {
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(bad("the period must be s, min or h")),
    };
    let rate = size_bytes(size).map_err(bad)? / seconds;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(bad("must be more than 0"));
    }
    Ok(rate)
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    sudo bridge-trace record --pid 1234 --duration 60s -o leaks.svg\n  \
    sudo bridge-trace record -o leaks.svg -o leaks.txt -- ./my-service --port 8080")]
pub struct RecordArgs {
    /// Attach to this running process (all its threads, including ones created later).
    #[arg(long, short = 'p', value_name = "PID")]
    pub pid: Option<u32>,
    /// Stop after this long (e.g. 60s, 5m). Without it: until Ctrl-C or the target exits.
    #[arg(long, short = 'd', value_name = "DURATION")]
    pub duration: Option<String>,
    /// Where to write the report; repeat for several formats. The format comes from the
    /// extension (.svg, .folded, .json, .txt, .pb.gz, .html) unless --format is given. `-` is
    /// standard output (the summary then goes to stderr). The raw capture (.btcap) is written
    /// beside the first file unless --no-raw.
    /// Default: <program>-<pid>-<time>.svg in the current directory.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Vec<PathBuf>,
    /// Format of the (single) output, overriding its extension.
    #[arg(long, short = 'f', value_enum)]
    pub format: Option<Format>,
    /// Report only allocations at least this old when recording stops (leaks are old).
    #[arg(long, value_name = "DURATION")]
    pub min_age: Option<String>,
    /// Capacity of the kernel's live-allocation map; allocations beyond it are counted as dropped.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ALLOCS)]
    pub max_allocs: u32,
    /// How many call stacks the text report and the summary list.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// How to walk stacks: `dwarf` unwinds with each object's call-frame information
    /// (.eh_frame), which is right for code built without frame pointers; `fp` follows frame
    /// pointers only; `auto` uses the tables where they are loaded, frame pointers elsewhere.
    #[arg(long, value_enum, default_value_t = Unwind::Auto)]
    pub unwind: Unwind,
    /// Do not print the live status line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Permissions of the files written, in octal. Under sudo they belong to the invoking user.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    pub mode: String,
    /// Do not write the raw capture (`.btcap`, beside the first output written to a file), from
    /// which `bridge-trace report` renders the recording again later, anywhere.
    #[arg(long)]
    pub no_raw: bool,
    /// Also trace the processes the target forks (and theirs), from their first instruction:
    /// each is reported as a process of its own, under a root frame `NAME [pid N]`. A child is
    /// held (stopped) at its first page fault, for the milliseconds its probes take to attach.
    #[arg(long)]
    pub follow_children: bool,
    /// Trace a custom allocator too, by function: `NAME:alloc` (returns a block of its first
    /// argument's size), `NAME:free` (releases its first argument), or `calloc`, `realloc`,
    /// `memalign` for those argument layouts. Repeatable; e.g. a message pool:
    /// `--alloc-fn bridge_pool_get:alloc --alloc-fn bridge_pool_put:free`.
    #[arg(long, value_name = "NAME:KIND")]
    pub alloc_fn: Vec<String>,
    /// Program to launch and trace until it exits (everything after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Output formats, one renderer each (see [`crate::report`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Interactive flamegraph (inferno), widths in bytes.
    Svg,
    /// One line per stack: frames root first joined by `;`, a space, bytes.
    Folded,
    /// Stacks with bytes, counts, ages and frames (module, offset, function, file, line).
    Json,
    /// The top stacks, readable in a terminal or a ticket.
    Text,
    /// Gzipped profile.proto for `go tool pprof`, Pyroscope and other pprof tools.
    Pprof,
    /// One self-contained page for a ticket: summary, caveats, top sites, the flamegraph.
    Html,
}

impl Format {
    pub fn from_extension(path: &Path) -> Option<Format> {
        if path.to_str()?.ends_with(".pb.gz") {
            return Some(Format::Pprof);
        }
        match path.extension()?.to_str()? {
            "svg" => Some(Format::Svg),
            "folded" | "collapsed" => Some(Format::Folded),
            "json" => Some(Format::Json),
            "txt" | "text" => Some(Format::Text),
            "pprof" => Some(Format::Pprof),
            "html" | "htm" => Some(Format::Html),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Svg => "svg",
            Format::Folded => "folded",
            Format::Json => "json",
            Format::Text => "txt",
            Format::Pprof => "pb.gz",
            Format::Html => "html",
        }
    }
}

/// Stack walking (`--unwind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unwind {
    Auto,
    Dwarf,
    Fp,
}

impl Unwind {
    pub fn mode(self) -> bridge_trace_common::UnwindMode {
        use bridge_trace_common::UnwindMode;
        match self {
            Unwind::Auto => UnwindMode::Auto,
            Unwind::Dwarf => UnwindMode::Dwarf,
            Unwind::Fp => UnwindMode::Fp,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unwind::Auto => "auto",
            Unwind::Dwarf => "dwarf",
            Unwind::Fp => "fp",
        }
    }
}

/// What to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Pid(u32),
    Command(Vec<OsString>),
}

/// A validated `record` request.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: Target,
    pub duration: Option<Duration>,
    /// Empty: a default name is chosen once the target is known.
    pub outputs: Vec<(PathBuf, Format)>,
    /// Format of the default output.
    pub default_format: Format,
    pub min_age: Option<Duration>,
    pub max_allocs: u32,
    pub top: usize,
    pub unwind: Unwind,
    pub quiet: bool,
    /// Permissions of the files written.
    pub mode: u32,
    /// No raw capture beside the outputs.
    pub no_raw: bool,
    /// Trace the processes the target forks too, each as a process of its own.
    pub follow_children: bool,
    /// Custom allocator functions (`--alloc-fn`).
    pub alloc_fns: Vec<(String, crate::target::EntryKind)>,
}

impl Config {
    /// What `record` traces and how.
    pub fn trace_options(&self) -> TraceOptions {
        TraceOptions {
            max_allocs: self.max_allocs,
            unwind: self.unwind,
        }
    }

    /// Parses and validates `bridge-trace record ...` arguments (`args[0]` is the program name).
    pub fn from_args<I, T>(args: I) -> std::result::Result<Config, ArgsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        match Request::from_args(args)? {
            Request::Record(c) => Ok(c),
            _ => Err(ArgsError::Invalid(Error::Usage("not a record".into()))),
        }
    }

    pub fn from_record_args(args: RecordArgs) -> Result<Config> {
        let target = match (args.pid, args.command.is_empty()) {
            (Some(_), false) => {
                return Err(Error::Usage(
                    "give either --pid PID or -- CMD ARGS..., not both".into(),
                ))
            }
            (None, true) => {
                return Err(Error::Usage(
                    "nothing to trace: give --pid PID or -- CMD ARGS...".into(),
                ))
            }
            (Some(0), true) => return Err(Error::Usage("--pid 0 is not a process".into())),
            (Some(pid), true) => Target::Pid(pid),
            (None, false) => Target::Command(args.command),
        };
        let duration = args
            .duration
            .as_deref()
            .map(|d| parse_duration("--duration", d))
            .transpose()?;
        if duration == Some(Duration::ZERO) {
            return Err(Error::Usage("--duration must be longer than 0".into()));
        }
        let min_age = args
            .min_age
            .as_deref()
            .map(|d| parse_duration("--min-age", d))
            .transpose()?;
        if args.max_allocs == 0 {
            return Err(Error::Usage("--max-allocs must be at least 1".into()));
        }
        let outputs = outputs_by_format(args.output, args.format)?;
        Ok(Config {
            target,
            duration,
            outputs,
            default_format: args.format.unwrap_or(Format::Svg),
            min_age,
            max_allocs: args.max_allocs,
            top: args.top.max(1),
            unwind: args.unwind,
            quiet: args.quiet,
            mode: parse_mode(&args.mode)?,
            no_raw: args.no_raw,
            follow_children: args.follow_children,
            alloc_fns: args
                .alloc_fn
                .iter()
                .map(|f| parse_alloc_fn(f))
                .collect::<Result<_>>()?,
        })
    }
}

/// Output paths with their formats: `format` for a single one, else each path's extension.
fn outputs_by_format(
    paths: Vec<PathBuf>,
    format: Option<Format>,
) -> Result<Vec<(PathBuf, Format)>> {
    if format.is_some() && paths.len() > 1 {
        return Err(Error::Usage(
            "--format applies to a single -o; with several, each extension names its format".into(),
        ));
    }
    let mut outputs = Vec::new();
    for path in paths {
        let format = match format.or_else(|| Format::from_extension(&path)) {
            Some(f) => f,
            None => {
                return Err(Error::Usage(format!(
                    "cannot tell the format of {} from its extension: use .svg, .folded, \
                     .json, .txt, .pb.gz or .html, or --format",
                    path.display()
                )))
            }
        };
        check_writable(&path)?;
        outputs.push((path, format));
    }
    Ok(outputs)
}

/// A validated request, one per subcommand.
#[derive(Clone, Debug)]
pub enum Request {
    Record(Config),
    Watch(WatchConfig),
    Diff(crate::diff::DiffConfig),
    Report(crate::rerender::ReportConfig),
    /// The benchmark's floor (or a part of it), on this pid.
    Floor(u32, FloorParts),
}

impl Request {
    /// Parses and validates `bridge-trace ...` arguments (`args[0]` is the program name).
    pub fn from_args<I, T>(args: I) -> std::result::Result<Request, ArgsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(ArgsError::Clap)?;
        match cli.command {
            Command::Record(a) => Config::from_record_args(a).map(Request::Record),
            Command::Watch(a) => WatchConfig::from_watch_args(*a).map(Request::Watch),
            Command::Top(a) => WatchConfig::from_top_args(a).map(Request::Watch),
            Command::Diff(a) => diff_config(a).map(Request::Diff),
            Command::Report(a) => report_config(a).map(Request::Report),
            Command::Floor(a) => Ok(Request::Floor(a.pid, a.parts)),
        }
        .map_err(ArgsError::Invalid)
    }
}

/// Why arguments were rejected: clap's own errors (including --help) or a validation error.
#[derive(Debug)]
pub enum ArgsError {
    Clap(clap::Error),
    Invalid(Error),
}

/// Parses a duration such as `60s`, `5m`, `1h30m`, `500ms`; a bare number is seconds.
pub fn parse_duration(flag: &'static str, value: &str) -> Result<Duration> {
    let trimmed = value.trim();
    let bad = |reason: String| Error::BadDuration {
        flag,
        value: value.to_string(),
        reason,
    };
    if trimmed.is_empty() {
        return Err(bad("empty".into()));
    }
    if let Ok(secs) = trimmed.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return Err(bad("must be a non-negative number of seconds".into()));
        }
        return Duration::try_from_secs_f64(secs).map_err(|e| bad(e.to_string()));
    }
    humantime::parse_duration(trimmed).map_err(|e| bad(e.to_string()))
}

fn report_config(a: ReportArgs) -> Result<crate::rerender::ReportConfig> {
    for dir in &a.debug_dir {
        if !dir.is_dir() {
            return Err(Error::Usage(format!(
                "--debug-dir {}: not a directory",
                dir.display()
            )));
        }
    }
    let outputs = if a.output.is_empty() {
        vec![(PathBuf::from("-"), a.format.unwrap_or(Format::Text))]
    } else {
        outputs_by_format(a.output, a.format)?
    };
    Ok(crate::rerender::ReportConfig {
        capture: a.capture,
        outputs,
        top: a.top.max(1),
        debug_dirs: a.debug_dir,
        mode: parse_mode(&a.mode)?,
    })
}

fn diff_config(a: DiffArgs) -> Result<crate::diff::DiffConfig> {
    let mut outputs = Vec::new();
    for path in a.output {
        let format = crate::diff::DiffFormat::from_path(&path).ok_or_else(|| {
            Error::Usage(format!(
                "cannot tell what to write to {} from its extension: use .svg, .folded or .txt",
                path.display()
            ))
        })?;
        check_writable(&path)?;
        outputs.push((path, format));
    }
    Ok(crate::diff::DiffConfig {
        before: a.before,
        after: a.after,
        outputs,
        top: a.top.max(1),
        mode: parse_mode(&a.mode)?,
    })
}

/// `NAME:KIND` of `--alloc-fn`.
pub fn parse_alloc_fn(text: &str) -> Result<(String, crate::target::EntryKind)> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "invalid --alloc-fn '{text}': {why} (expected NAME:KIND, KIND one of alloc, free, \
             calloc, realloc, memalign)"
        ))
    };
    let (name, kind) = text.rsplit_once(':').ok_or_else(|| bad("no ':'"))?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(bad("no function name"));
    }
    let kind = crate::target::EntryKind::parse(kind).ok_or_else(|| bad("unknown kind"))?;
    Ok((name.to_string(), kind))
}

/// File permissions in octal (`600`, `0644`), nothing beyond rwx for user, group and others.
pub fn parse_mode(text: &str) -> Result<u32> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            Error::Usage(format!(
                "invalid --mode '{text}': permissions in octal, such as 600 or 644"
            ))
        })
}

/// Fails early, before anything is traced, when `path` could not be written.
pub fn check_writable(path: &Path) -> Result<()> {
    let err = |reason: &str| Error::Output {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    match crate::report::destination(path).map_err(|reason| err(&reason))? {
        // Written in place: nothing to create.
        crate::report::Destination::Stdout | crate::report::Destination::Stream => return Ok(()),
        crate::report::Destination::File => {}
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(err("its directory does not exist"));
    }
    let c = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes())
        .map_err(|_| err("the path contains a NUL byte"))?;
    // SAFETY: plain syscall on a valid C string.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(err("its directory is not writable"));
    }
    // access(2) ignores read-only mounts for root; statvfs does not.
    // SAFETY: plain syscall on a valid C string and a zeroed out-struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 && st.f_flag & libc::ST_RDONLY != 0 {
        return Err(err("its directory is on a read-only file system"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("--r", "64KiB/s").unwrap(), 65536.0);
        assert_eq!(parse_rate("--r", "6MB/min").unwrap(), 100_000.0);
        assert_eq!(parse_rate("--r", "1000").unwrap(), 1000.0);
        for bad in ["", "KiB/s", "5XB/s", "5MB/day", "0/s", "-1/s"] {
            assert!(parse_rate("--r", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn watch_arguments() {
        let w = |args: &[&str]| {
            let mut all = vec!["bridge-trace", "watch"];
            all.extend_from_slice(args);
            Request::from_args(all)
        };
        match w(&[
            "--pid",
            "42",
            "--interval",
            "2s",
            "--alert-growth",
            "1MiB/min",
        ]) {
            Ok(Request::Watch(c)) => {
                assert_eq!(c.interval, Duration::from_secs(2));
                assert_eq!(c.alert_growth, Some(1024.0 * 1024.0 / 60.0));
                assert_eq!(c.metrics_addr.unwrap().to_string(), "127.0.0.1:9464");
            }
            other => panic!("{other:?}"),
        }
        assert!(w(&["--pid", "0"]).is_err());
        assert!(w(&["--pid", "1", "--interval", "10ms"]).is_err());
        assert!(
            w(&["--interval", "1s"]).is_err(),
            "--pid or --exe is required"
        );
        assert!(
            w(&["--pid", "1", "--exe", "/bin/true"]).is_err(),
            "not both"
        );
        assert!(w(&["--exe", "/no/such/program"]).is_err());
        match w(&["--exe", "/bin/../bin/true"]) {
            Ok(Request::Watch(c)) => {
                assert_eq!(c.target, WatchTarget::Exe("/usr/bin/true".into()))
            }
            other => panic!("{other:?}"),
        }
    }

    fn config(args: &[&str]) -> std::result::Result<Config, String> {
        let mut full = vec!["bridge-trace", "record"];
        full.extend_from_slice(args);
        Config::from_args(full).map_err(|e| match e {
            ArgsError::Clap(e) => e.to_string(),
            ArgsError::Invalid(e) => e.to_string(),
        })
    }

    #[test]
    fn pid_and_command_targets() {
        let c = config(&["--pid", "42", "-o", "/tmp/x.svg"]).unwrap();
        assert_eq!(c.target, Target::Pid(42));
        assert_eq!(c.outputs, vec![(PathBuf::from("/tmp/x.svg"), Format::Svg)]);
        let c = config(&["--", "sleep", "1"]).unwrap();
        assert_eq!(c.target, Target::Command(vec!["sleep".into(), "1".into()]));
        assert!(c.outputs.is_empty());
    }

    #[test]
    fn conflicting_or_missing_targets() {
        let e = config(&["--pid", "42", "--", "sleep", "1"]).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = config(&[]).unwrap_err();
        assert!(e.contains("nothing to trace"), "{e}");
        let e = config(&["--pid", "0"]).unwrap_err();
        assert!(e.contains("not a process"), "{e}");
    }

    #[test]
    fn formats_from_extension_and_flag() {
        let c = config(&[
            "-p",
            "1",
            "-o",
            "/tmp/a.folded",
            "-o",
            "/tmp/b.json",
            "-o",
            "/tmp/c.txt",
        ])
        .unwrap();
        let formats: Vec<_> = c.outputs.iter().map(|(_, f)| *f).collect();
        assert_eq!(formats, [Format::Folded, Format::Json, Format::Text]);
        let c = config(&["-p", "1", "-o", "/tmp/report", "--format", "json"]).unwrap();
        assert_eq!(c.outputs[0].1, Format::Json);
        let e = config(&["-p", "1", "-o", "/tmp/report"]).unwrap_err();
        assert!(e.contains("cannot tell the format"), "{e}");
        let e = config(&[
            "-p",
            "1",
            "-o",
            "/tmp/a.svg",
            "-o",
            "/tmp/b.svg",
            "-f",
            "svg",
        ])
        .unwrap_err();
        assert!(e.contains("single -o"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("d", "60s").unwrap(), Duration::from_secs(60));
        assert_eq!(
            parse_duration("d", "1.5").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("d", "5m").unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_duration("d", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["", "abc", "-1", "10 parsecs", "1e400", "NaN"] {
            let e = parse_duration("--duration", bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid duration"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = config(&["-p", "1", "--duration", "0s"]).unwrap_err();
        assert!(e.contains("longer than 0"), "{e}");
    }

    #[test]
    fn modes_are_octal_permissions() {
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        for bad in ["", "8", "1777", "rw-", "-1"] {
            let e = parse_mode(bad).unwrap_err().to_string();
            assert!(e.contains("invalid --mode"), "{bad}: {e}");
        }
        assert_eq!(config(&["-p", "1"]).unwrap().mode, 0o600);
    }

    #[test]
    fn unwritable_outputs_fail_early() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let e = config(&["-p", "1", "-o", d, "-f", "svg"]).unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
        let missing = format!("{d}/missing/x.svg");
        let e = config(&["-p", "1", "-o", &missing]).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
    }
}
