//! Groups live allocations by their symbolized call stack into a [`Report`]: bytes, counts and
//! the oldest age per stack, after the `--min-age` filter, largest first.
use std::collections::HashMap;

use bridge_trace_common::MAX_STACK_DEPTH;
use serde::{Deserialize, Serialize};

use crate::{
    attach::ProgramCost,
    collect::{Counters, Snapshot},
    symbolize::{Frame, Symbolize},
    unwind::UnwindSummary,
};

/// Format version of the JSON report.
pub const REPORT_VERSION: u32 = 1;

/// What was traced, for how long, and what was lost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

/// Builds the report: filters by age, symbolizes every frame once, groups identical stacks.
pub fn aggregate(
    snapshot: &Snapshot,
    symbolizer: &mut dyn Symbolize,
    min_age_ns: Option<u64>,
    meta: Meta,
) -> Report {
    let now = snapshot.taken_ns;
    let mut younger = 0u64;
    let kept: Vec<_> = snapshot
        .allocs
        .iter()
        .filter(|a| match min_age_ns {
            Some(min) if now.saturating_sub(a.ts_ns) < min => {
                younger += 1;
                false
            }
            _ => true,
        })
        .collect();

    // Raw stack per allocation: the stored frames, or just the direct caller.
    let raw = |a: &crate::collect::LiveAlloc| -> (Vec<u64>, bool, bool) {
        match snapshot.stacks.get(&a.stack_id) {
            Some(s) => (s.frames.clone(), s.truncated, false),
            None => (vec![a.ret_addr], false, true),
        }
    };
    let mut addrs: Vec<u64> = Vec::new();
    for a in &kept {
        addrs.extend(raw(a).0);
    }
    addrs.sort_unstable();
    addrs.dedup();
    let names = symbolizer.symbolize(&addrs);

    // Estimates are summed unrounded (sampled allocations stand for fractions of several).
    let mut groups: HashMap<Vec<Frame>, (StackReport, f64, f64)> = HashMap::new();
    for a in kept {
        let (frames, truncated, partial) = raw(a);
        // Leaf first in the kernel's order; reverse to root first.
        let mut named: Vec<Frame> = Vec::new();
        for addr in frames.iter().rev() {
            match names.get(addr) {
                Some(fs) => named.extend(fs.iter().cloned()),
                None => named.push(Frame::unknown(None, None)),
            }
        }
        let age = now.saturating_sub(a.ts_ns) as f64 / 1e9;
        let (entry, bytes, count) = groups.entry(named.clone()).or_insert_with(|| {
            let r = StackReport {
                bytes: 0,
                count: 0,
                oldest_age_secs: 0.0,
                frames: named,
                truncated,
                partial,
            };
            (r, 0.0, 0.0)
        });
        let (b, c) = a.estimate();
        *bytes += b;
        *count += c;
        entry.oldest_age_secs = entry.oldest_age_secs.max(age);
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
    Report {
        meta: Meta {
            younger_than_min_age: younger,
            ..meta
        },
        stacks,
    }
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
    use crate::collect::{LiveAlloc, RawStack};

    struct Fake;
    impl Symbolize for Fake {
        fn symbolize(&mut self, addrs: &[u64]) -> HashMap<u64, Vec<Frame>> {
            addrs
                .iter()
                .map(|&a| {
                    let mut f = Frame::unknown(Some("/bin/x".into()), Some(a));
                    f.function = Some(format!("f{a:x}"));
                    (a, vec![f])
                })
                .collect()
        }
    }

    fn alloc(size: u64, ts_ns: u64, stack_id: u64, ret_addr: u64) -> LiveAlloc {
        LiveAlloc {
            addr: ts_ns,
            size,
            ts_ns,
            stack_id,
            ret_addr,
            kind: None,
            tid: 1,
            interval: 0,
        }
    }

    fn meta() -> Meta {
        Meta {
            version: REPORT_VERSION,
            target: "t".into(),
            pid: 1,
            duration_secs: 1.0,
            target_exited: false,
            min_age_secs: None,
            allocator: "libc".into(),
            counters: Counters::default(),
            younger_than_min_age: 0,
            unwind: None,
            programs: Vec::new(),
            sample_interval: None,
        }
    }

    #[test]
    fn groups_filters_and_sorts() {
        let mut snap = Snapshot {
            taken_ns: 10_000_000_000,
            ..Default::default()
        };
        snap.stacks.insert(
            7,
            RawStack {
                frames: vec![0xa, 0xb, 0xc],
                truncated: false,
            },
        );
        snap.allocs = vec![
            alloc(100, 1_000_000_000, 7, 0xa),
            alloc(50, 2_000_000_000, 7, 0xa),
            alloc(500, 9_500_000_000, 7, 0xa), // young
            alloc(30, 3_000_000_000, 0, 0xd),  // stack lost: caller only
        ];
        let r = aggregate(&snap, &mut Fake, Some(1_000_000_000), meta());
        assert_eq!(r.meta.younger_than_min_age, 1);
        assert_eq!(r.stacks.len(), 2);
        assert_eq!(r.stacks[0].bytes, 150);
        assert_eq!(r.stacks[0].count, 2);
        assert_eq!(r.stacks[0].oldest_age_secs, 9.0);
        let names: Vec<_> = r.stacks[0]
            .frames
            .iter()
            .map(|f| f.display_name())
            .collect();
        assert_eq!(names, ["fc", "fb", "fa"]);
        assert!(r.stacks[1].partial);
        assert_eq!(r.total_bytes(), 180);
    }
}
