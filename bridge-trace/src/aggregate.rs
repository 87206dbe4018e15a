//! Groups live allocations by their symbolized call stack into a [`Report`]: bytes, counts and
//! the oldest age per stack, after the `--min-age` filter, largest first.
use std::collections::HashMap;

use bridge_trace_common::MAX_STACK_DEPTH;
use serde::{Deserialize, Serialize};

use crate::{
    attach::ProgramCost,
    capture::{Capture, Module},
    collect::Counters,
    symbolize::{symbolize_locations, Frame, Symbolize},
    unwind::UnwindSummary,
};

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
    pub processes: Vec<ProcessInfo>,
}

/// A process of a recording that followed children.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub name: String,
    /// The traced process that forked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
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

/// One call stack holding memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StackReport {
    pub bytes: u64,
    pub count: u64,
    pub oldest_age_secs: f64,
    /// Root first, the allocation's direct caller last.
    pub frames: Vec<Frame>,
    /// The stack was deeper than the kernel walk's limit; the root side is missing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Only the direct caller is known (the stack could not be stored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// The report every renderer draws.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub meta: Meta,
    /// Largest first.
    pub stacks: Vec<StackReport>,
}

/// A caveat's wording, given its count.
type Note = fn(u64) -> String;

impl Report {
    pub fn total_bytes(&self) -> u64 {
        self.stacks.iter().map(|s| s.bytes).sum()
    }

    pub fn total_count(&self) -> u64 {
        self.stacks.iter().map(|s| s.count).sum()
    }

    /// Lines that say what the numbers miss; empty when nothing was lost.
    pub fn caveats(&self) -> Vec<String> {
        let c = &self.meta.counters;
        let notes: [(u64, Note); 11] = [
            (c.map_full_drops, |n| {
                format!(
                    "{n} allocations were not recorded (live-allocation map full; raise \
                     --max-allocs): totals are lower bounds"
                )
            }),
            (c.inflight_full, |n| {
                format!(
                    "{n} allocator calls were lost (in-flight map full): totals are lower bounds"
                )
            }),
            (c.lost_returns, |n| {
                format!(
                    "{n} allocations were missed (their return probe did not run): totals are \
                     lower bounds"
                )
            }),
            (c.missed_probe_runs, |n| {
                format!(
                    "{n} probe runs were skipped by the kernel (another BPF program was running \
                     on that CPU): up to that many allocations or frees were not seen"
                )
            }),
            (c.stack_failures, |n| {
                format!("{n} allocations have only their direct caller (stack not stored)")
            }),
            (c.unknown_frees, |n| {
                format!("{n} frees of memory allocated before tracing started (or not recorded)")
            }),
            (c.read_faults, |n| {
                format!("{n} posix_memalign results could not be read")
            }),
            (c.unwind_no_table, |n| {
                format!(
                    "{n} frames were walked with frame pointers, no unwind table covering their \
                     code (yet): a stack through code built without frame pointers may be cut \
                     short there"
                )
            }),
            (c.unwind_bad_rule, |n| {
                format!(
                    "{n} stack walks stopped at a frame whose unwind rule bridge-trace cannot \
                     evaluate"
                )
            }),
            (c.unwind_read_fault, |n| {
                format!("{n} stack walks stopped at a stack slot that could not be read")
            }),
            (c.unwind_depth_limit, |n| {
                format!(
                    "{n} stacks were deeper than {MAX_STACK_DEPTH} frames: their root side is cut"
                )
            }),
        ];
        let mut out: Vec<String> = notes
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, note)| note(*n))
            .collect();
        if let Some(interval) = self.meta.sample_interval {
            out.push(format!(
                "allocations were sampled (one per {} allocated, on average; {} calls passed \
                 unrecorded): bytes and counts are unbiased estimates, not exact",
                crate::report::human_bytes(interval),
                c.unsampled
            ));
        }
        if let Some(u) = &self.meta.unwind {
            for (object, reason) in &u.missing {
                out.push(format!("no unwind table for {object}: {reason}"));
            }
        }
        out
    }
}

/// Builds the report from a capture: names every location once, then groups the stacks that
/// name the same frames.
pub fn aggregate(capture: &Capture, symbolizer: &mut dyn Symbolize) -> Report {
    let names = symbolize_locations(
        symbolizer,
        &capture.modules,
        capture.stacks.iter().flat_map(|s| s.frames.iter().copied()),
    );
    // Estimates are summed unrounded (sampled allocations stand for fractions of several).
    let mut groups: HashMap<Vec<Frame>, (StackReport, f64, f64)> = HashMap::new();
    for s in &capture.stacks {
        // Leaf first in the kernel's order; reverse to root first, under its process's frame
        // when several processes were traced.
        let process = s
            .process
            .and_then(|p| capture.processes.get(p as usize))
            .map(|p| Frame::named(format!("{} [pid {}]", p.name, p.pid)));
        // Memory the program mapped itself stands apart, under a frame of its own.
        let mapped = s.mmap.then(|| Frame::named(MMAP_FRAME.into()));
        let mut named: Vec<Frame> = process
            .into_iter()
            .chain(mapped)
            .chain(s.frames.iter().rev().flat_map(|l| names[l].iter().cloned()))
            .collect();
        // C++'s operator new ends in malloc: its caller is the allocation site.
        while named.len() > 1 && named.last().is_some_and(is_operator_new) {
            named.pop();
        }
        let (entry, bytes, count) = groups.entry(named.clone()).or_insert_with(|| {
            let r = StackReport {
                bytes: 0,
                count: 0,
                oldest_age_secs: 0.0,
                frames: named,
                truncated: s.truncated,
                partial: s.partial,
            };
            (r, 0.0, 0.0)
        });
        *bytes += s.bytes;
        *count += s.count;
        entry.oldest_age_secs = entry.oldest_age_secs.max(s.oldest_age_secs);
    }
    let mut stacks: Vec<StackReport> = groups
        .into_values()
        .map(|(mut r, bytes, count)| {
            r.bytes = bytes.round() as u64;
            r.count = count.round() as u64;
            r
        })
        .collect();
    sort_stacks(&mut stacks);
    let mut meta = capture.meta.clone();
    meta.modules = capture.modules.clone();
    meta.processes = capture
        .processes
        .iter()
        .map(|p| ProcessInfo {
            pid: p.pid,
            name: p.name.clone(),
            parent: p.parent,
        })
        .collect();
    Report { meta, stacks }
}

/// The root frame of anonymous memory the program mapped itself.
pub const MMAP_FRAME: &str = "[anonymous mmap]";

/// A C++ runtime's `operator new` (any variant), which only forwards to malloc.
fn is_operator_new(f: &Frame) -> bool {
    f.function
        .as_deref()
        .is_some_and(|name| name.starts_with("operator new"))
}

/// Largest first; ties broken by the frames so that output is deterministic.
pub fn sort_stacks(stacks: &mut [StackReport]) {
    stacks.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.count.cmp(&a.count))
            .then_with(|| a.frames.cmp(&b.frames))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{CapturedStack, Location};

    struct Fake;
    impl Symbolize for Fake {
        fn symbolize(&mut self, module: &Module, offsets: &[u64]) -> Vec<Vec<Frame>> {
            offsets
                .iter()
                .map(|&o| {
                    // Two offsets name one frame: their stacks merge.
                    let mut f = Frame::unknown(Some(module.path.clone()), Some(o & !1));
                    f.function = Some(format!("f{:x}", o & !1));
                    vec![f]
                })
                .collect()
        }
    }

    fn stack(frames: &[u64], bytes: f64, count: f64, age: f64) -> CapturedStack {
        CapturedStack {
            frames: frames
                .iter()
                .map(|&offset| Location {
                    module: Some(0),
                    offset,
                })
                .collect(),
            truncated: false,
            partial: false,
            bytes,
            count,
            oldest_age_secs: age,
            process: None,
            mmap: false,
        }
    }

    #[test]
    fn names_groups_and_sorts() {
        let capture = Capture {
            meta: Meta::default(),
            modules: vec![Module {
                path: "/bin/x".into(),
                build_id: None,
            }],
            mappings: Vec::new(),
            stacks: vec![
                stack(&[0xa, 0xb, 0xc], 100.0, 1.0, 9.0),
                stack(&[0xa, 0xb, 0xd], 50.4, 1.4, 3.0),
                stack(&[0xe], 160.0, 2.0, 1.0),
            ],
            processes: Vec::new(),
        };
        let r = aggregate(&capture, &mut Fake);
        assert_eq!(r.stacks.len(), 2);
        assert_eq!((r.stacks[0].bytes, r.stacks[0].count), (160, 2));
        assert_eq!((r.stacks[1].bytes, r.stacks[1].count), (150, 2));
        assert_eq!(r.stacks[1].oldest_age_secs, 9.0);
        let names: Vec<_> = r.stacks[1]
            .frames
            .iter()
            .map(|f| f.display_name())
            .collect();
        assert_eq!(names, ["fc", "fa", "fa"]);
        assert_eq!(r.meta.modules, capture.modules);
        assert_eq!(r.total_bytes(), 310);
    }
}
