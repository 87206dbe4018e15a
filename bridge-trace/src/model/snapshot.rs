//! What the kernel half knew about a process at one moment, owned: its live allocations and
//! self-mapped regions with their stacks, heap growth per stack, and the counters. Filled by
//! [`crate::collect`] (the only reader of the kernel maps), read by the capture and `watch`.
use std::collections::HashMap;

use bridge_trace_common::{AllocKind, LIFETIME_BUCKETS, WEIGHTED};

use super::counters::Counters;

/// One allocation still live when the snapshot was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveAlloc {
    pub addr: u64,
    pub size: u64,
    /// CLOCK_MONOTONIC nanoseconds at allocation.
    pub ts_ns: u64,
    pub stack_id: u64,
    pub ret_addr: u64,
    pub kind: Option<AllocKind>,
    pub tid: u32,
    /// 0: every allocation was recorded; [`WEIGHTED`] | weight for a sample that carries the
    /// bytes it stands for (the process's own sampler, or the kernel's); else the mean
    /// sampling interval in bytes of a sample weighted by 1 / its probability.
    pub interval: u64,
}

impl LiveAlloc {
    /// The probability that the byte sampler picked this allocation: 1 - exp(-size / interval),
    /// or 1 when every allocation was recorded.
    pub fn sample_probability(&self) -> f64 {
        if self.interval == 0 {
            return 1.0;
        }
        if let Some(w) = self.weight() {
            // The bytes it stands for over its own: the inverse of its weight per byte.
            return (self.size.max(1) as f64 / w.max(1) as f64).min(1.0);
        }
        let p = -(-(self.size as f64) / self.interval as f64).exp_m1();
        if p > 0.0 {
            p
        } else {
            1.0
        }
    }

    /// The (bytes, allocations) this allocation stands for: itself when every allocation was
    /// recorded, else its size and 1 divided by the probability it was sampled (the unbiased
    /// estimate jemalloc and tcmalloc use); a sample the process reported stands for its
    /// weight in bytes, and as many allocations of its size.
    pub fn estimate(&self) -> (f64, f64) {
        if let Some(w) = self.weight() {
            return (w as f64, w as f64 / self.size.max(1) as f64);
        }
        let p = self.sample_probability();
        (self.size as f64 / p, 1.0 / p)
    }

    /// The weight this sample carries (`otel_memory:alloc`, or the kernel's sampler), if any.
    pub fn weight(&self) -> Option<u64> {
        (self.interval & WEIGHTED != 0).then_some(self.interval & !WEIGHTED)
    }
}

/// Heap growth attributed to one stack of one process (`watch --tier growth`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackGrowth {
    pub stack_id: u64,
    pub ret_addr: u64,
    /// Bytes added by brk and anonymous mmap/mremap.
    pub mapped: u64,
    /// Bytes given back by brk, munmap and mremap.
    pub unmapped: u64,
    /// Bytes of pages touched for the first time.
    pub faulted: u64,
    pub events: u64,
}

/// What one stack of one process allocated since tracing began (its running totals in the
/// kernel): the allocation profile, beside the live set's "in use".
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StackAllocated {
    pub stack_id: u64,
    pub ret_addr: u64,
    /// Allocations recorded and the bytes they asked for.
    pub recorded: u64,
    pub recorded_bytes: u64,
    /// What they stand for: exact when every allocation was recorded, else unbiased
    /// estimates from the samples' weights.
    pub bytes: f64,
    pub count: f64,
    /// What the freed ones stood for (as `bytes` and `count`): `bytes - freed_bytes` is what
    /// the stack holds now.
    pub freed_bytes: f64,
    pub freed_count: f64,
    /// The recorded frees by how long their blocks lived
    /// ([`bridge_trace_common::LIFETIME_BOUNDS_NS`]).
    pub lifetimes: [u64; LIFETIME_BUCKETS],
}

/// A captured call stack: return addresses, the direct caller first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawStack {
    pub frames: Vec<u64>,
    pub truncated: bool,
}

impl Snapshot {
    /// The call site of `a`: its stack's first frame outside `skip` (an interposing sampler's
    /// code), or its direct caller when the stack was not stored.
    pub fn site_addr(&self, a: &LiveAlloc, skip: &[(u64, u64)]) -> u64 {
        let inside = |pc: u64| skip.iter().any(|&(lo, hi)| pc >= lo && pc < hi);
        self.stacks
            .get(&a.stack_id)
            .and_then(|s| s.frames.iter().copied().find(|&pc| !inside(pc)))
            .unwrap_or(a.ret_addr)
    }

    /// Drops, from the top of every stack, the frames inside `ranges` (the code of an
    /// in-process sampler that interposes the allocator: its frames are not the program's).
    /// A stack made only of such frames keeps its last one.
    pub fn drop_leading_frames(&mut self, ranges: &[(u64, u64)]) {
        if ranges.is_empty() {
            return;
        }
        let inside = |pc: u64| ranges.iter().any(|&(lo, hi)| pc >= lo && pc < hi);
        for s in self.stacks.values_mut() {
            let n = s.frames.iter().take_while(|&&pc| inside(pc)).count();
            let n = n.min(s.frames.len().saturating_sub(1));
            s.frames.drain(..n);
        }
    }
}

/// Everything the kernel knew about the target at one moment, owned.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub allocs: Vec<LiveAlloc>,
    /// Anonymous memory the process mapped itself (mmap, mremap) while traced and still
    /// mapped, when the growth probes are attached.
    pub regions: Vec<LiveAlloc>,
    /// Heap growth per stack since tracing began (growth tracepoints attached).
    pub growth: Vec<StackGrowth>,
    /// What each stack allocated since tracing began, freed or not.
    pub allocated: Vec<StackAllocated>,
    pub stacks: HashMap<u64, RawStack>,
    pub counters: Counters,
    /// CLOCK_MONOTONIC nanoseconds when the snapshot was taken.
    pub taken_ns: u64,
}

/// Cheap figures for the live status line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Status {
    pub counters: Counters,
    pub outstanding_bytes: i64,
}
