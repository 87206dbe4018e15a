//! The `bridge-trace` binary: parse arguments, run, print the outcome or one error line, and
//! pick the exit code (documented in the README).
use std::process::ExitCode;

use bridge_trace::{
    cli::{ArgsError, Request},
    cmd::{diff, floor, record, report, sampler, watch},
    error::exit_code,
    output::{self, Destination},
    units::human_bytes,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDGE_TRACE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The helper `--inject` runs to make its calls into a process (a process of its own).
    let mut args = std::env::args_os().skip(1);
    if args
        .next()
        .is_some_and(|a| a == bridge_trace::target::inject::HELPER_ARG)
    {
        let rest: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
        return ExitCode::from(bridge_trace::target::inject::helper_main(&rest) as u8);
    }
    let request = match Request::from_args(std::env::args_os()) {
        Ok(r) => r,
        Err(ArgsError::Clap(e)) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's first line says what is wrong; the usage that follows is noise here.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("bridge-trace: {}", first.trim_start_matches("error: "));
            eprintln!("bridge-trace: see `bridge-trace --help`");
            return ExitCode::from(exit_code::USAGE as u8);
        }
        Err(ArgsError::Invalid(e)) => {
            eprintln!("bridge-trace: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let result = match &request {
        Request::Record(config) => record::run(config).map(|mut outcome| {
            for (module, why) in &outcome.not_fetched {
                eprintln!("bridge-trace: debuginfod: no debug file for {module}: {why}");
            }
            print_summary(&outcome, config.top.min(5));
            // The report is out; the probes' detach may take a few seconds more.
            outcome.detached();
            // A launched command's own status, as `time` and `strace` pass it on: scripts
            // that run a program under bridge-trace still see how it ended.
            match (&config.target, outcome.target_status) {
                (record::Target::Command(_), Some(code)) => ExitCode::from(code as u8),
                _ => ExitCode::SUCCESS,
            }
        }),
        Request::Watch(config) => watch::run(config).map(|()| ExitCode::SUCCESS),
        Request::Diff(config) => diff::run(config).map(|table| {
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(table.as_bytes());
            ExitCode::SUCCESS
        }),
        Request::Report(config) => report::run(config).map(|rendered| {
            for (module, frames, why) in &rendered.unnamed {
                eprintln!("bridge-trace: {frames} frames in {module} left unnamed: {why}");
            }
            for (module, why) in &rendered.not_fetched {
                eprintln!("bridge-trace: debuginfod: no debug file for {module}: {why}");
            }
            ExitCode::SUCCESS
        }),
        Request::Floor(pid, parts) => floor::run(*pid, *parts).map(|()| ExitCode::SUCCESS),
        Request::SamplerInstall(dir) => sampler::install(dir).map(|(path, advice)| {
            println!("{}", path.display());
            eprintln!("bridge-trace: {advice}");
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bridge-trace: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Prints the summary on stdout (on stderr when the report itself went there); a closed stdout
/// (`| head`) is not an error worth a panic.
fn print_summary(outcome: &record::Outcome, top: usize) {
    use std::fmt::Write as _;
    let mut text = String::new();
    macro_rules! o {
        ($($arg:tt)*) => {{
            let _ = writeln!(text, $($arg)*);
        }};
    }
    let r = &outcome.report;
    let why = match outcome.stop {
        record::StopReason::Duration => "duration reached".to_string(),
        record::StopReason::Interrupted => "interrupted".to_string(),
        record::StopReason::TargetExited => match outcome.target_status {
            Some(code) => format!("target exited with status {code}"),
            None => "target exited".to_string(),
        },
    };
    o!(
        "bridge-trace: {} (pid {}), {:.1}s, {why}: {} ({} bytes) outstanding in {} allocations",
        r.meta.target,
        r.meta.pid,
        r.meta.duration_secs,
        human_bytes(r.total_bytes()),
        r.total_bytes(),
        r.total_count()
    );
    if let Some(u) = &r.meta.unwind {
        o!("  stacks: {}", u.describe());
    }
    for p in &r.meta.processes {
        match p.parent {
            Some(parent) => o!(
                "  process: {} (pid {}), forked by pid {parent}",
                p.name,
                p.pid
            ),
            None => o!("  process: {} (pid {})", p.name, p.pid),
        }
    }
    for caveat in r.caveats() {
        o!("  note: {caveat}");
    }
    if !r.stacks.is_empty() {
        o!("top call sites holding memory:");
    }
    for s in r.stacks.iter().take(top) {
        let leaf = s.frames.last();
        let name = leaf.map(|f| f.display_name()).unwrap_or("[unknown]");
        let at = match leaf.and_then(|f| f.file.as_ref().zip(f.line)) {
            Some((file, line)) => format!(" ({}:{line})", file.rsplit('/').next().unwrap_or(file)),
            None => String::new(),
        };
        o!(
            "  {:>12} bytes in {:>7} allocations  {name}{at}",
            s.bytes,
            s.count
        );
    }
    let mut to_stdout = false;
    for (path, format) in &outcome.written {
        if output::destination(path) == Ok(Destination::Stdout) {
            to_stdout = true;
            o!("wrote standard output ({format:?})");
        } else {
            o!("wrote {} ({format:?})", path.display());
        }
    }
    if let Some(path) = &outcome.capture {
        o!(
            "wrote {} (raw capture: `bridge-trace report {}` renders it again, anywhere)",
            path.display(),
            path.display()
        );
    }
    use std::io::Write as _;
    if to_stdout {
        let _ = std::io::stderr().write_all(text.as_bytes());
    } else {
        let _ = std::io::stdout().write_all(text.as_bytes());
    }
}
