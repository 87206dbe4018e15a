//! A validated `record` request: what to trace, for how long, and where the report goes.
use std::{ffi::OsString, path::PathBuf, time::Duration};

use crate::{
    aggregate::{suppress::Suppressions, View},
    render::Format,
    symbolize::DebuginfodConfig,
    target::EntryKind,
    unwind::Unwind,
};

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
    /// Which profile the flamegraph and folded outputs show.
    pub view: View,
    pub unwind: Unwind,
    pub quiet: bool,
    /// List every entry point probed at the start.
    pub verbose: bool,
    /// Permissions of the files written.
    pub mode: u32,
    /// No raw capture beside the outputs.
    pub no_raw: bool,
    /// Trace the processes the target forks too, each as a process of its own.
    pub follow_children: bool,
    /// Launch the program with the in-process sampler preloaded (`--sampler`).
    pub sampler: bool,
    /// Trace a process that carries the otel_memory contract through it (not `--no-usdt`).
    pub usdt: bool,
    /// Load the sampler into the process first (`--inject`), sampling every this many bytes.
    pub inject: Option<u64>,
    /// Custom allocator functions (`--alloc-fn`).
    pub alloc_fns: Vec<(String, EntryKind)>,
    /// Allocation wrappers a site is named past (`--wrapper`).
    pub wrappers: Vec<String>,
    /// `--suppress` files' rules, and whether the program's own apply (`--suppress-declared`).
    pub suppress: Suppressions,
    pub suppress_declared: bool,
    /// Where the debug files missing here are fetched from (`--debuginfod`, DEBUGINFOD_URLS).
    pub debuginfod: Option<DebuginfodConfig>,
}
