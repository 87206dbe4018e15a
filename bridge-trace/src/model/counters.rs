//! What was seen, lost or skipped while tracing: one table, [`COUNTERS`], defines each counter
//! once (its JSON field, where its value comes from, and what a report says when it is not
//! zero); the [`Counters`] struct, the summing of the kernel's per-CPU counters and the
//! caveats are all made from it.
use bridge_trace_common::{Counter, MAX_STACK_DEPTH};
use serde::{Deserialize, Serialize};

/// Where a counter's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The kernel half's per-CPU counter, summed over CPUs.
    Kernel(Counter),
    /// The kernel's statistics of the loaded programs (`bpf_prog_info`).
    Programs,
}

/// What a report says when a counter is not zero.
#[derive(Clone, Copy, Debug)]
pub enum Caveat {
    /// Nothing: the counter is a figure, not a loss.
    None,
    /// Events were lost: every total is a lower bound. Said first.
    LowerBound(fn(u64) -> String),
    /// Something the figures miss or simplify.
    Note(fn(u64) -> String),
}

/// One counter of [`COUNTERS`].
pub struct CounterDef {
    /// The JSON field (and the [`Counters`] field).
    pub name: &'static str,
    pub source: Source,
    pub caveat: Caveat,
    get: fn(&Counters) -> u64,
    slot: fn(&mut Counters) -> &mut u64,
}

/// Defines [`Counters`] (one `u64` field per row, in this order, which is the JSON order) and
/// [`COUNTERS`] (the rows).
macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $field:ident: $source:expr, $caveat:expr; )*) => {
        /// What was seen, lost or skipped while tracing. Every report shows these.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Counters {
            $( $(#[doc = $doc])* pub $field: u64, )*
        }

        /// Every counter, in [`Counters`]' order.
        pub const COUNTERS: &[CounterDef] = &[
            $( CounterDef {
                name: stringify!($field),
                source: $source,
                caveat: $caveat,
                get: |c| c.$field,
                slot: |c| &mut c.$field,
            }, )*
        ];
    };
}

use Caveat::{LowerBound, Note};
use Source::{Kernel, Programs};

counters! {
    /// Allocations recorded.
    allocs: Kernel(Counter::Allocs), Caveat::None;
    /// Frees (and realloc moves) of a recorded allocation.
    frees: Kernel(Counter::Frees), Caveat::None;
    /// Allocator calls that failed (NULL, or an error for posix_memalign).
    failed_allocs: Kernel(Counter::FailedAllocs), Caveat::None;
    /// Allocations not recorded because the live-allocation map was full.
    map_full_drops: Kernel(Counter::AllocMapFull), LowerBound(|n| {
        format!(
            "{n} allocations were not recorded (live-allocation map full; raise \
             --max-allocs): totals are lower bounds"
        )
    });
    /// Allocations whose stack could not be stored (attributed to their direct caller only).
    stack_failures: Kernel(Counter::StackFailures), Note(|n| {
        format!("{n} allocations have only their direct caller (stack not stored)")
    });
    /// Frees of addresses not recorded (allocated before attaching, or dropped).
    unknown_frees: Kernel(Counter::UnknownFrees), Note(|n| {
        format!("{n} frees of memory allocated before tracing started (or not recorded)")
    });
    /// Allocator calls made inside another traced allocator call (counted once, outside).
    nested_calls: Kernel(Counter::Nested), Caveat::None;
    /// Calls whose entry could not be remembered until their return (in-flight map full).
    inflight_full: Kernel(Counter::InflightFull), LowerBound(|n| {
        format!("{n} allocator calls were lost (in-flight map full): totals are lower bounds")
    });
    /// Per-stack totals that could not be updated (per-stack map full).
    stack_totals_full: Kernel(Counter::StackTotalsFull), Caveat::None;
    /// Return probes that fired without a matching entry (attached mid-call).
    orphan_returns: Kernel(Counter::OrphanReturns), Caveat::None;
    /// posix_memalign out-pointers that could not be read back.
    read_faults: Kernel(Counter::ReadFaults), Note(|n| {
        format!("{n} posix_memalign results could not be read")
    });
    /// Times a launched target was held at `_exit` so its maps could be read.
    exit_stops: Kernel(Counter::ExitStops), Caveat::None;
    /// Allocator calls whose return probe never ran (the allocation was not recorded).
    lost_returns: Kernel(Counter::LostReturns), LowerBound(|n| {
        format!(
            "{n} allocations were missed (their return probe did not run): totals are lower \
             bounds"
        )
    });
    /// Probe runs the kernel skipped (another BPF program was running on that CPU).
    missed_probe_runs: Programs, LowerBound(|n| {
        format!(
            "{n} probe runs were skipped by the kernel (another BPF program was running on \
             that CPU): up to that many allocations or frees were not seen"
        )
    });
    /// Frames walked with frame pointers because no unwind table covered them.
    unwind_no_table: Kernel(Counter::UnwindNoTable), Note(|n| {
        format!(
            "{n} frames were walked with frame pointers, no unwind table covering their code \
             (yet): a stack through code built without frame pointers may be cut short there"
        )
    });
    /// Stack walks stopped by an unwind rule the kernel half cannot evaluate.
    unwind_bad_rule: Kernel(Counter::UnwindBadRule), Note(|n| {
        format!(
            "{n} stack walks stopped at a frame whose unwind rule bridge-trace cannot evaluate"
        )
    });
    /// Stack walks stopped by an unreadable saved register or return address.
    unwind_read_fault: Kernel(Counter::UnwindReadFault), Note(|n| {
        format!("{n} stack walks stopped at a stack slot that could not be read")
    });
    /// Stacks truncated at the depth limit.
    unwind_depth_limit: Kernel(Counter::UnwindDepthLimit), Note(|n| {
        format!("{n} stacks were deeper than {MAX_STACK_DEPTH} frames: their root side is cut")
    });
    /// Times a launched target was held where it had mapped new objects (its start, a dlopen)
    /// so that their unwind tables loaded before their code ran.
    start_stops: Kernel(Counter::StartStops), Caveat::None;
    /// Allocations the byte sampler let pass (sampled tier).
    unsampled: Kernel(Counter::Unsampled), Caveat::None;
    /// Heap growth events seen: brk, anonymous mmap/munmap/mremap, first-touch page faults.
    growth_events: Kernel(Counter::GrowthEvents), Caveat::None;
    /// munmap/mremap of an address not seen mapped.
    unmatched_unmaps: Kernel(Counter::UnmatchedUnmaps), Caveat::None;
    /// Growth not recorded because the region or per-stack growth map was full.
    growth_map_full: Kernel(Counter::GrowthMapFull), Caveat::None;
    /// Children held at their first page fault until their probes were attached.
    child_stops: Kernel(Counter::ChildStops), Caveat::None;
    /// Releases seen again inside the release that made them, counted once.
    nested_frees: Kernel(Counter::NestedFrees), Caveat::None;
    /// Frees, by the allocator's own code, of addresses it never handed out (glibc's
    /// per-thread cache giving back its cached chunks when a thread exits).
    internal_frees: Kernel(Counter::InternalFrees), Caveat::None;
    /// Frees, by a followed child, of its copies of blocks its parent allocated before the fork.
    inherited_frees: Kernel(Counter::InheritedFrees), Caveat::None;
    /// Probe runs skipped because another of bridge-trace's programs was preempted mid-run
    /// on that CPU.
    busy_cpu_runs: Kernel(Counter::BusyCpu), LowerBound(|n| {
        format!(
            "{n} probe runs were skipped (another of bridge-trace's probes was preempted on \
             that CPU): up to that many allocations or frees were not seen"
        )
    });
    /// Sampled allocations the process reported through the `otel_memory` contract.
    usdt_allocs: Kernel(Counter::UsdtAllocs), Caveat::None;
    /// Frees of reported samples not seen allocated (reported before bridge-trace attached).
    usdt_unknown_frees: Kernel(Counter::UsdtUnknownFrees), Caveat::None;
    /// Samples not kept because their process held as many as its cap.
    usdt_capped: Kernel(Counter::UsdtCapped), LowerBound(|n| {
        format!(
            "{n} samples were not kept: their process held as many live samples as its cap \
             (--max-samples)"
        )
    });
}

impl Counters {
    /// The kernel's counters, each summed by `sum` (over CPUs); the others are left as they are.
    pub fn set_from_kernel(&mut self, mut sum: impl FnMut(Counter) -> u64) {
        for def in COUNTERS {
            if let Source::Kernel(c) = def.source {
                *(def.slot)(self) = sum(c);
            }
        }
    }

    /// Events whose loss makes the reported totals lower bounds.
    pub fn lossy(&self) -> bool {
        COUNTERS
            .iter()
            .any(|d| matches!(d.caveat, Caveat::LowerBound(_)) && (d.get)(self) > 0)
    }

    /// What the figures miss, in words: the losses that make totals lower bounds first, then
    /// the rest, each in [`COUNTERS`]' order.
    pub fn caveats(&self) -> Vec<String> {
        let lower = COUNTERS.iter().filter_map(|d| match d.caveat {
            Caveat::LowerBound(say) => Some((d, say)),
            _ => None,
        });
        let notes = COUNTERS.iter().filter_map(|d| match d.caveat {
            Caveat::Note(say) => Some((d, say)),
            _ => None,
        });
        lower
            .chain(notes)
            .map(|(d, say)| ((d.get)(self), say))
            .filter(|(n, _)| *n > 0)
            .map(|(n, say)| say(n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_counter_has_one_field() {
        for c in Counter::ALL {
            let fields: Vec<_> = COUNTERS
                .iter()
                .filter(|d| d.source == Source::Kernel(c))
                .map(|d| d.name)
                .collect();
            assert_eq!(fields.len(), 1, "{c:?} is summed into {fields:?}");
        }
        let mut c = Counters::default();
        c.set_from_kernel(|k| k as u64 + 1);
        assert_eq!(c.allocs, 1);
        assert_eq!(c.nested_frees, Counter::NestedFrees as u64 + 1);
        assert_eq!(c.missed_probe_runs, 0, "not a kernel counter");
    }

    #[test]
    fn the_table_names_the_json_fields() {
        let c = Counters {
            unknown_frees: 7,
            ..Counters::default()
        };
        let json = serde_json::to_value(c).unwrap();
        let names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut expected: Vec<&str> = COUNTERS.iter().map(|d| d.name).collect();
        expected.sort_unstable();
        let mut names = names;
        names.sort_unstable();
        assert_eq!(names, expected);
        assert_eq!(json["unknown_frees"], 7);
    }

    #[test]
    fn losses_are_said_first() {
        let c = Counters {
            stack_failures: 2,
            inflight_full: 3,
            missed_probe_runs: 1,
            ..Counters::default()
        };
        let said = c.caveats();
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(
            said[0].starts_with("3 allocator calls were lost"),
            "{said:?}"
        );
        assert!(said[1].starts_with("1 probe runs were skipped"), "{said:?}");
        assert!(said[2].starts_with("2 allocations have only"), "{said:?}");
        assert!(c.lossy());
        assert!(!Counters::default().lossy());
        assert!(Counters::default().caveats().is_empty());
    }
}
