//! `record`'s arguments, and the validated [`Config`] made of them.
use std::{ffi::OsString, path::PathBuf, time::Duration};

use bridge_trace_common::DEFAULT_MAX_ALLOCS;
use clap::Args;

use super::outputs_by_format;
use crate::{
    aggregate::View,
    cmd::record::{Config, Target},
    error::{Error, Result},
    render::Format,
    target::EntryKind,
    units::{parse_mode, parse_optional_duration},
    unwind::Unwind,
};
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
    /// What the flamegraph and folded outputs show: `inuse`, the memory still held when
    /// recording stopped; `alloc`, everything allocated while traced, freed or not. Text,
    /// JSON, HTML and pprof carry both.
    #[arg(long, value_enum, default_value_t = View::Inuse)]
    pub view: View,
    /// How to walk stacks: `dwarf` unwinds with each object's call-frame information
    /// (.eh_frame), which is right for code built without frame pointers; `fp` follows frame
    /// pointers only; `auto` uses the tables where they are loaded, frame pointers elsewhere.
    #[arg(long, value_enum, default_value_t = Unwind::Auto)]
    pub unwind: Unwind,
    /// Do not print the live status line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Also list, at the start, every entry point probed (the JSON report always has them).
    #[arg(long, short = 'v')]
    pub verbose: bool,
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
    /// An allocation wrapper of the program (a function that only forwards to the allocator):
    /// sites are named past it, at its callers. An exact name, or a prefix ending in `*`;
    /// repeatable. The C++ operators and well-known wrappers (xmalloc, g_malloc, zmalloc,
    /// CRYPTO_malloc, PyMem_Malloc, ...) are built in; others are detected from the stacks (a
    /// function named like an allocator, on top of it, called from two or more functions).
    #[arg(long, value_name = "NAME")]
    pub wrapper: Vec<String>,
    /// A suppression file in LeakSanitizer's format (`leak:FUNCTION`, `leak:libvendor.so`,
    /// `leak:file.c`; `*` wildcards, `^`/`$` anchors): held stacks with a matching frame are
    /// left out of the report, and counted and said per rule. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub suppress: Vec<PathBuf>,
    /// Apply the suppressions the program declares itself (its `__lsan_default_suppressions`).
    #[arg(long)]
    pub suppress_declared: bool,
    /// Launch the program with bridge-trace's in-process sampler preloaded (`LD_PRELOAD`; its
    /// mean interval from BRIDGE_TRACE_SAMPLE_INTERVAL, default 512KiB) and trace it through
    /// the otel_memory probes the sampler fires: sampled allocations and their frees only,
    /// weighted estimates instead of exact figures, at a fraction of the cost. `-- CMD` only.
    #[arg(long)]
    pub sampler: bool,
    /// Trace a process that samples its own heap (the otel_memory USDT probes: one started
    /// with the sampler preloaded, say) with uprobes on its allocator like any other: exact
    /// figures, at their cost. By default its probes are used.
    #[arg(long, conflicts_with = "sampler")]
    pub no_usdt: bool,
    /// With --pid: load bridge-trace's sampler into the running process (ptrace; it stops a
    /// few milliseconds) and trace it through the sampler's probes. By default the sampler
    /// reports every allocation (--inject-interval 1): exact figures, cheaper than uprobes
    /// where the allocator's entries are single-stepped (jemalloc's free). The library stays
    /// in the process, idle, when recording ends.
    #[arg(long, conflicts_with_all = ["sampler", "no_usdt"])]
    pub inject: bool,
    /// With --inject: mean bytes between sampled allocations (1: every one; 512KiB: as
    /// `watch`), weighted estimates above 1.
    #[arg(long, value_name = "SIZE", default_value = "1", requires = "inject")]
    pub inject_interval: String,
    #[command(flatten)]
    pub debuginfod: super::DebuginfodArgs,
    /// Program to launch and trace until it exits (everything after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Validates `record`'s arguments.
pub fn record_config(args: RecordArgs) -> Result<Config> {
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
    if args.sampler && matches!(target, Target::Pid(_)) {
        return Err(Error::Usage(
            "--sampler preloads the sampler into a program record launches (-- CMD); a running \
             process must have been started with it (see `bridge-trace sampler install`)"
                .into(),
        ));
    }
    if args.inject && !matches!(target, Target::Pid(_)) {
        return Err(Error::Usage(
            "--inject loads the sampler into a running process (--pid); a program record \
             launches gets it preloaded with --sampler"
                .into(),
        ));
    }
    let inject = match args.inject {
        true => Some(super::sample_size(
            "--inject-interval",
            &args.inject_interval,
        )?),
        false => None,
    };
    let duration = parse_optional_duration("--duration", args.duration.as_deref())?;
    if duration == Some(Duration::ZERO) {
        return Err(Error::Usage("--duration must be longer than 0".into()));
    }
    let min_age = parse_optional_duration("--min-age", args.min_age.as_deref())?;
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
        view: args.view,
        unwind: args.unwind,
        quiet: args.quiet,
        verbose: args.verbose,
        mode: parse_mode(&args.mode)?,
        no_raw: args.no_raw,
        follow_children: args.follow_children,
        sampler: args.sampler,
        usdt: !args.no_usdt,
        inject,
        alloc_fns: args
            .alloc_fn
            .iter()
            .map(|f| parse_alloc_fn(f))
            .collect::<Result<_>>()?,
        wrappers: super::wrappers(args.wrapper)?,
        suppress: super::suppressions(&args.suppress)?,
        suppress_declared: args.suppress_declared,
        debuginfod: args.debuginfod.config()?,
    })
}

/// `NAME:KIND` of `--alloc-fn`.
pub fn parse_alloc_fn(text: &str) -> Result<(String, EntryKind)> {
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
    let kind = EntryKind::parse(kind).ok_or_else(|| bad("unknown kind"))?;
    Ok((name.to_string(), kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{ArgsError, Request};

    fn config(args: &[&str]) -> std::result::Result<Config, String> {
        let mut full = vec!["bridge-trace", "record"];
        full.extend_from_slice(args);
        match Request::from_args(full) {
            Ok(Request::Record(c)) => Ok(c),
            Ok(other) => panic!("not a record: {other:?}"),
            Err(ArgsError::Clap(e)) => Err(e.to_string()),
            Err(ArgsError::Invalid(e)) => Err(e.to_string()),
        }
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
    fn zero_duration_is_refused() {
        let e = config(&["-p", "1", "--duration", "0s"]).unwrap_err();
        assert!(e.contains("longer than 0"), "{e}");
    }

    #[test]
    fn default_mode_is_private() {
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
