//! The command line: arguments as clap parses them, validated into one [`Request`] per
//! subcommand, each carrying the config type its command defines. The top of the tree: nothing
//! in the library imports this module.
mod offline;
mod record;
mod watch;

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand};

pub use offline::{DiffArgs, ReportArgs};
pub use record::{parse_alloc_fn, RecordArgs};
pub use watch::{TopArgs, WatchArgs};

use crate::{
    attach::FloorParts,
    cmd::{diff::DiffConfig, record::Config, report::ReportConfig, watch::WatchConfig},
    error::{Error, Result},
    output::check_writable,
    render::Format,
    symbolize::DebuginfodConfig,
};

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
    /// bridge-trace's in-process heap sampler, a library to preload into a service
    /// (`LD_PRELOAD`): it samples allocations by bytes inside the process and reports them
    /// through the OpenTelemetry otel_memory USDT probes, which `watch`, `top` and `record`
    /// then use (tier usdt: the cheapest way to see allocation stacks).
    #[command(subcommand)]
    Sampler(SamplerCommand),
    /// The benchmark's floor: empty probes on malloc and free (hidden; `cargo xtask bench`).
    #[command(hide = true)]
    Floor(FloorArgs),
}

#[derive(Debug, Subcommand)]
pub enum SamplerCommand {
    /// Write libbridge_trace_sampler.so into DIR (created if missing), for a service to
    /// preload: e.g. a systemd drop-in with Environment=LD_PRELOAD=DIR/libbridge_trace_sampler.so.
    Install {
        /// Where to put it: a directory every user of the service can read.
        dir: PathBuf,
    },
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

/// Where `record` and `report` fetch the debug files this machine lacks.
#[derive(Debug, Args)]
pub struct DebuginfodArgs {
    /// Fetch, by build-id, the debug file of each module whose frames have no name or no line
    /// here (a stripped binary, a library without its -dbg package) from this debuginfod
    /// server. Repeatable; default: the servers in DEBUGINFOD_URLS (keep it under sudo with
    /// `sudo --preserve-env=DEBUGINFOD_URLS`); off without either. A request gives up after
    /// DEBUGINFOD_TIMEOUT seconds (default 15); the files are kept in DEBUGINFOD_CACHE_PATH
    /// (default ~/.cache/debuginfod_client).
    #[arg(long, value_name = "URL")]
    pub debuginfod: Vec<String>,
}

impl DebuginfodArgs {
    fn config(&self) -> Result<Option<DebuginfodConfig>> {
        DebuginfodConfig::from_flags_or_env(&self.debuginfod)
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
    Diff(DiffConfig),
    Report(ReportConfig),
    /// The benchmark's floor (or a part of it), on this pid.
    Floor(u32, FloorParts),
    /// Write the sampler library into this directory.
    SamplerInstall(PathBuf),
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
            Command::Record(a) => record::record_config(a).map(Request::Record),
            Command::Watch(a) => watch::watch_config(*a).map(Request::Watch),
            Command::Top(a) => watch::top_config(a).map(Request::Watch),
            Command::Diff(a) => offline::diff_config(a).map(Request::Diff),
            Command::Report(a) => offline::report_config(a).map(Request::Report),
            Command::Floor(a) => Ok(Request::Floor(a.pid, a.parts)),
            Command::Sampler(SamplerCommand::Install { dir }) => Ok(Request::SamplerInstall(dir)),
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

/// The rules of the `--suppress` files, each read and checked now.
fn suppressions(files: &[PathBuf]) -> Result<crate::aggregate::suppress::Suppressions> {
    let mut out = crate::aggregate::suppress::Suppressions::default();
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::Usage(format!("--suppress {}: {e}", f.display())))?;
        out.parse(&text, &f.display().to_string())
            .map_err(|e| Error::Usage(format!("--suppress {e}")))?;
    }
    Ok(out)
}

/// `--wrapper` names, checked.
fn wrappers(names: Vec<String>) -> Result<Vec<String>> {
    for n in &names {
        if n.trim().is_empty() || n.trim() == "*" {
            return Err(Error::Usage(format!(
                "--wrapper '{n}': give a function name (or a prefix ending in '*')"
            )));
        }
    }
    Ok(names.into_iter().map(|n| n.trim().to_string()).collect())
}

/// A sampler's mean interval (`--sample-interval`, `--inject-interval`): 1 B to 1 TiB.
fn sample_size(flag: &'static str, value: &str) -> Result<u64> {
    let v = crate::units::parse_size(flag, value)?;
    if v == 0 || v > bridge_trace_common::MAX_SAMPLE_INTERVAL {
        return Err(Error::Usage(format!("{flag} must be between 1B and 1TiB")));
    }
    Ok(v)
}
