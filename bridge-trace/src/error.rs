//! The library's typed errors; each one displays as the single line the user sees.
use std::path::PathBuf;

/// Exit codes, documented in the README.
pub mod exit_code {
    /// A run-time failure (eBPF, I/O while tracing).
    pub const FAILURE: i32 = 1;
    /// Bad input: arguments, durations, output paths, input files.
    pub const USAGE: i32 = 2;
    /// Not root, or missing CAP_BPF / CAP_PERFMON.
    pub const PERMISSION: i32 = 3;
    /// The target: no such process, gone before attach, nothing to trace in it.
    pub const TARGET: i32 = 4;
    /// `--inject` refused (the process is left untouched) or failed.
    pub const INJECT: i32 = 5;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("invalid duration '{value}' for {flag}: {reason} (examples: 60s, 5m, 1h30m, 500ms)")]
    BadDuration {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot write {}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
    /// An input file (a report to compare) that cannot be read or is not what it should be.
    #[error("cannot read {}: {reason}", path.display())]
    Input { path: PathBuf, reason: String },
    #[error("{0}")]
    Permission(String),
    #[error("no process with PID {0}")]
    NoSuchProcess(u32),
    #[error("process {0} exited before bridge-trace could attach")]
    ExitedBeforeAttach(u32),
    #[error("PID {0} is a kernel thread: it has no user-space allocator to trace")]
    KernelThread(u32),
    #[error("no allocator found in process {pid}: searched {searched} for malloc/free")]
    NoAllocator { pid: u32, searched: String },
    #[error(
        "{0} is a Go program: Go allocates from its own garbage-collected heap, not through \
         malloc, so there is nothing for bridge-trace to trace (use Go's own heap profile, \
         runtime/pprof)"
    )]
    GoProgram(String),
    /// `--inject` will not load the sampler into this process, or could not.
    #[error("cannot inject the sampler into process {pid}: {reason}")]
    Inject { pid: u32, reason: String },
    #[error("cannot run '{command}': {reason}")]
    Spawn { command: String, reason: String },
    #[error("eBPF: {0}")]
    Ebpf(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_)
            | Error::BadDuration { .. }
            | Error::Output { .. }
            | Error::Input { .. } => exit_code::USAGE,
            Error::Permission(_) => exit_code::PERMISSION,
            Error::NoSuchProcess(_)
            | Error::ExitedBeforeAttach(_)
            | Error::KernelThread(_)
            | Error::NoAllocator { .. }
            | Error::GoProgram(_)
            | Error::Spawn { .. } => exit_code::TARGET,
            Error::Inject { .. } => exit_code::INJECT,
            Error::Ebpf(_) | Error::Io { .. } => exit_code::FAILURE,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
