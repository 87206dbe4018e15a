//! What a recording knows about itself: the target, the machine, when and how long it was
//! traced, what was lost ([`Counters`]), how stacks were walked ([`UnwindSummary`]) and what
//! each eBPF program cost ([`ProgramCost`]). Travels in the capture and in every report.
use serde::{Deserialize, Serialize};

use super::{
    counters::Counters,
    maps::{Mapping, Module},
    sites::Wrappers,
};

/// [`Meta::tier`] of a process traced through the `otel_memory` contract: allocations the
/// process sampled itself, with their weights.
pub const USDT_TIER: &str = "usdt";

/// Format version of the JSON report.
pub const REPORT_VERSION: u32 = 1;

/// What was traced, where, when, for how long, and what was lost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    /// Program name (comm) or command line.
    pub target: String,
    pub pid: u32,
    pub duration_secs: f64,
    /// The target exited while recording; the report is what it never freed.
    pub target_exited: bool,
    pub min_age_secs: Option<f64>,
    /// Allocator object the probes were attached to.
    pub allocator: String,
    pub counters: Counters,
    /// Live allocations left out by `--min-age`.
    pub younger_than_min_age: u64,
    /// How stacks were walked, and what loading the unwind tables cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unwind: Option<UnwindSummary>,
    /// What each eBPF program cost while tracing (run time only with kernel.bpf_stats_enabled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramCost>,
    /// Mean bytes between sampled allocations when allocations were sampled (`watch --tier
    /// sampled`): bytes and counts are then unbiased estimates, not exact figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_interval: Option<u64>,
    /// The target's executable, as it saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// The machine's host name and kernel release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// When tracing started, UTC (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// What was traced: `full` (every allocation, `record`), `sampled` or `growth` (`watch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// The object files the stacks pass through, with their build-ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<Module>,
    /// With `--follow-children`: every process traced, the first one then its children; each
    /// stack's root frame names its process (`name [pid N]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<Process>,
    /// The allocation wrappers a site is named past: `--wrapper` names, and in a report the
    /// ones detected from its stacks.
    #[serde(default, skip_serializing_if = "Wrappers::is_default")]
    pub wrappers: Wrappers,
    /// Per allocator object, every entry point probed (`family (path) [malloc, free+3, ...]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entry_points: Vec<String>,
    /// `watch`: the verdicts reached so far (leaks named while sampling), which a snapshot
    /// taken in another tier does not show in its stacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<String>,
    /// `--inject`: bridge-trace loaded its sampler into the process, sampling every this many
    /// bytes (1: every allocation reported, each with its own size: exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injected: Option<u64>,
    /// The suppressions the program declares itself (what its `__lsan_default_suppressions`
    /// returns), applied with `--suppress-declared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_suppressions: Option<String>,
}

/// One process of a recording that followed children (`--follow-children`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub name: String,
    /// The traced process that forked it; none for the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    /// Its file mappings, in a capture (the first process's are the capture's own); none in a
    /// report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mappings: Vec<Mapping>,
}

impl Meta {
    /// With this machine's host name and kernel release.
    pub fn on_this_machine(self) -> Meta {
        let read = |what: &str| {
            std::fs::read_to_string(format!("/proc/sys/kernel/{what}"))
                .ok()
                .map(|s| s.trim().to_string())
        };
        Meta {
            host: read("hostname"),
            kernel: read("osrelease"),
            ..self
        }
    }
}

/// What loading unwind tables cost and found, for the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UnwindSummary {
    /// `fp`, `auto` or `dwarf`.
    pub mode: String,
    /// Objects whose tables were loaded.
    pub objects: usize,
    pub rows: u64,
    /// Total time spent compiling tables (off the tracing path).
    pub build_ms: f64,
    /// The slowest object and its time.
    pub slowest: Option<(String, f64)>,
    /// Objects without a table, and why (their frames fall back to frame pointers).
    pub missing: Vec<(String, String)>,
}

impl UnwindSummary {
    /// One line: how stacks were walked and what the tables cost.
    pub fn describe(&self) -> String {
        if self.mode == "fp" {
            return "frame pointers (--unwind fp)".into();
        }
        let mut s = format!(
            "unwind tables (--unwind {}) for {} objects, {} rows, built in {:.0} ms",
            self.mode, self.objects, self.rows, self.build_ms
        );
        if let Some((object, ms)) = &self.slowest {
            s.push_str(&format!(" (slowest: {object}, {ms:.0} ms)"));
        }
        s
    }
}

/// One eBPF program's cost, as the kernel counted it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    /// Total run time; 0 unless `kernel.bpf_stats_enabled` was 1 while tracing.
    pub run_time_ns: u64,
    pub missed_runs: u64,
}
