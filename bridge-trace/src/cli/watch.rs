//! `watch`'s and `top`'s arguments, and the validated [`WatchConfig`] made of them (`top` is a
//! watch without metrics or alerts that draws its view every window).
use std::{path::PathBuf, time::Duration};

use bridge_trace_common::DEFAULT_MAX_ALLOCS;
use clap::Args;

use crate::{
    cmd::watch::{Tier, WatchConfig, WatchTarget},
    error::{Error, Result},
    model::sites::Wrappers,
    output::check_dir,
    target,
    units::{
        parse_budget, parse_duration, parse_mode, parse_optional_duration, parse_rate, parse_size,
    },
    unwind::Unwind,
};

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
    /// An allocation wrapper of the program (a function that only forwards to the allocator):
    /// sites are named past it, at its callers. An exact name, or a prefix ending in `*`;
    /// repeatable. The C++ operators and well-known wrappers (xmalloc, g_malloc, zmalloc,
    /// CRYPTO_malloc, PyMem_Malloc, ...) are built in.
    #[arg(long, value_name = "NAME")]
    pub wrapper: Vec<String>,
    /// Load bridge-trace's sampler into the process first (see `watch --inject`) and show what
    /// its samples say, at a fraction of the uprobes' cost.
    #[arg(long)]
    pub inject: bool,
}
#[derive(Debug, Args)]
#[command(after_help = "Tiers (--tier), cheapest first:\n  \
    usdt     automatic, per process, for one that carries the otel_memory USDT probes (its\n           \
    own, or bridge-trace's sampler: --sampler, --inject): only what it sampled, and the\n           \
    frees of those; --no-usdt traces it at --tier instead\n  \
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
    #[arg(long, value_name = "PATH", conflicts_with = "cgroup")]
    pub exe: Option<PathBuf>,
    /// Watch every process of this cgroup (v2) and of its descendants, those started later
    /// too: a systemd service (`system.slice/nginx.service`) or a container's scope. A path in
    /// the cgroup file system or relative to it.
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    pub cgroup: Option<PathBuf>,
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
    /// Ignore the otel_memory USDT probes of a process that samples its own heap (such as one
    /// running with bridge-trace's sampler preloaded), and trace it with uprobes as any other.
    /// By default such a process is traced through its probes (tier usdt): the cheapest.
    #[arg(long)]
    pub no_usdt: bool,
    /// Load bridge-trace's sampler into the process (--pid, or each process of --exe) without
    /// a restart: ptrace stops it for a few milliseconds while it loads the library, which
    /// then samples every --sample-interval bytes, at tier usdt. The library stays in the
    /// process, idle (one load and a branch per call), after the watch.
    #[arg(long, conflicts_with = "no_usdt")]
    pub inject: bool,
    /// Live samples kept per process traced through its otel_memory probes: past it, its new
    /// samples are counted and dropped (checked every window) until it holds 1/8 fewer, so
    /// that one process cannot fill the live map for all (65536 samples stand for 32 GiB at
    /// the default 512 KiB interval).
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub max_samples: u64,
    /// Push each snapshot, as pprof, to a Pyroscope-compatible ingest endpoint (e.g.
    /// http://pyroscope:4040).
    #[arg(long, value_name = "URL")]
    pub push: Option<String>,
    /// Export each snapshot as an OpenTelemetry profile (OTLP/HTTP, protobuf: the four memory
    /// sample types) to this collector: URL/v1development/profiles (e.g.
    /// http://otel-collector:4318).
    #[arg(long, value_name = "URL")]
    pub otlp: Option<String>,
    /// Capacity of the kernel's live-allocation map.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ALLOCS)]
    pub max_allocs: u32,
    /// How to walk stacks (see `record --help`).
    #[arg(long, value_enum, default_value_t = Unwind::Auto)]
    pub unwind: Unwind,
    /// An allocation wrapper of the program (a function that only forwards to the allocator):
    /// sites are named past it, at its callers. An exact name, or a prefix ending in `*`;
    /// repeatable. The C++ operators and well-known wrappers (xmalloc, g_malloc, zmalloc,
    /// CRYPTO_malloc, PyMem_Malloc, ...) are built in.
    #[arg(long, value_name = "NAME")]
    pub wrapper: Vec<String>,
    /// With `-- CMD`: start the program with bridge-trace's in-process sampler preloaded
    /// (LD_PRELOAD; BRIDGE_TRACE_SAMPLE_INTERVAL=SIZE sets its mean interval) and watch it
    /// through its probes, at tier usdt.
    #[arg(long)]
    pub sampler: bool,
    /// A program to start and watch (after `--`), instead of --pid or --exe; it keeps running
    /// when the watch ends.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<std::ffi::OsString>,
}

pub fn watch_config(args: WatchArgs) -> Result<WatchConfig> {
    if args.sampler && args.command.is_empty() {
        return Err(Error::Usage(
            "--sampler starts the program given after `--` with the sampler preloaded: \
             `watch --sampler -- CMD ARGS` (a running process must have been started with it: \
             see `bridge-trace sampler install`)"
                .into(),
        ));
    }
    let target = match (args.pid, args.exe, args.cgroup) {
        (None, None, None) if !args.command.is_empty() => WatchTarget::Launch {
            argv: args.command,
            sampler: args.sampler,
        },
        _ if !args.command.is_empty() => {
            return Err(Error::Usage(
                "give one of --pid PID, --exe PATH, --cgroup PATH or -- CMD".into(),
            ))
        }
        (None, None, Some(dir)) => WatchTarget::Cgroup(target::cgroup::resolve(&dir)?),
        (Some(0), _, _) => return Err(Error::Usage("--pid 0 is not a process".into())),
        (Some(pid), None, None) => WatchTarget::Pid(pid),
        (None, Some(exe), None) => {
            let path = exe
                .canonicalize()
                .map_err(|e| Error::Usage(format!("--exe {}: {e}", exe.display())))?;
            // A process runs an ELF executable: anything else would be waited for forever.
            if !target::is_elf(&path) {
                return Err(Error::Usage(format!(
                    "--exe {}: not an executable ELF program (a script runs as its \
                     interpreter: give the program it starts)",
                    exe.display()
                )));
            }
            WatchTarget::Exe(path)
        }
        _ => {
            return Err(Error::Usage(
                "give --pid PID, --exe PATH, --cgroup PATH or -- CMD".into(),
            ))
        }
    };
    if args.inject && matches!(target, WatchTarget::Launch { .. }) {
        return Err(Error::Usage(
            "--inject loads the sampler into a running process (--pid, --exe or --cgroup); a \
             program watch starts gets it preloaded with --sampler"
                .into(),
        ));
    }
    let interval = parse_duration("--interval", &args.interval)?;
    if interval < Duration::from_millis(100) {
        return Err(Error::Usage("--interval must be at least 100ms".into()));
    }
    let duration = parse_optional_duration("--duration", args.duration.as_deref())?;
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
        sample_interval: super::sample_size("--sample-interval", &args.sample_interval)?,
        max_overhead: parse_budget(&args.max_overhead)?,
        fixed_tier: args.fixed_tier,
        usdt: !args.no_usdt,
        inject: args.inject,
        max_samples: args.max_samples.max(1),
        push: http_url("--push", args.push)?,
        otlp: http_url("--otlp", args.otlp)?,
        max_allocs: args.max_allocs,
        unwind: args.unwind,
        wrappers: Wrappers::new(super::wrappers(args.wrapper)?),
    })
}

/// `top`: a watch without metrics or alerts, printing its view every window.
pub fn top_config(args: TopArgs) -> Result<WatchConfig> {
    let watch = WatchArgs {
        pid: Some(args.pid),
        exe: None,
        cgroup: None,
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
        no_usdt: false,
        inject: args.inject,
        max_samples: 65536,
        push: None,
        otlp: None,
        max_allocs: DEFAULT_MAX_ALLOCS,
        unwind: args.unwind,
        wrapper: args.wrapper,
        sampler: false,
        command: Vec::new(),
    };
    Ok(WatchConfig {
        metrics_addr: None,
        view_rows: Some(args.rows.max(1)),
        ..watch_config(watch)?
    })
}

/// An endpoint option's URL, checked: http:// or https://, without a trailing slash.
fn http_url(option: &str, url: Option<String>) -> Result<Option<String>> {
    match url {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
            Ok(Some(url.trim_end_matches('/').to_string()))
        }
        Some(url) => Err(Error::Usage(format!(
            "{option} {url}: give an http:// or https:// URL"
        ))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Request;

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
        assert!(w(&["--sampler"]).is_err(), "--sampler starts a command");
        assert!(w(&["--pid", "1", "--", "/bin/true"]).is_err(), "not both");
        match w(&["--sampler", "--", "/bin/true", "x"]) {
            Ok(Request::Watch(c)) => assert_eq!(
                c.target,
                WatchTarget::Launch {
                    argv: vec!["/bin/true".into(), "x".into()],
                    sampler: true
                }
            ),
            other => panic!("{other:?}"),
        }
        assert!(w(&["--exe", "/no/such/program"]).is_err());
        match w(&["--exe", "/bin/../bin/true"]) {
            Ok(Request::Watch(c)) => {
                assert_eq!(c.target, WatchTarget::Exe("/usr/bin/true".into()))
            }
            other => panic!("{other:?}"),
        }
    }
}
