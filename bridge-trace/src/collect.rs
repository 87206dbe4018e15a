//! The only reader of the kernel maps: turns them into an owned [`Snapshot`] (and the live
//! [`Status`]); no aya type goes beyond this module.
use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use bridge_trace_common::{
    AllocInfo, AllocKey, AllocKind, Counter, GrowthTotals, MmapRegion, StackFrames, StackKey,
    StackTotals, STACK_TRUNCATED,
};
use serde::{Deserialize, Serialize};

use crate::{
    attach::Tracer,
    error::{Error, Result},
};

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
    /// Mean sampling interval in bytes when this allocation was sampled; 0: every allocation
    /// was recorded.
    pub interval: u64,
}

impl LiveAlloc {
    /// The probability that the byte sampler picked this allocation: 1 - exp(-size / interval),
    /// or 1 when every allocation was recorded.
    pub fn sample_probability(&self) -> f64 {
        if self.interval == 0 {
            return 1.0;
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
    /// estimate jemalloc and tcmalloc use).
    pub fn estimate(&self) -> (f64, f64) {
        let p = self.sample_probability();
        (self.size as f64 / p, 1.0 / p)
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
/// A captured call stack: return addresses, the direct caller first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawStack {
    pub frames: Vec<u64>,
    pub truncated: bool,
}

/// What was lost or skipped, from the kernel's counters. Every report shows these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub allocs: u64,
    pub frees: u64,
    pub failed_allocs: u64,
    /// Allocations not recorded because the live-allocation map was full.
    pub map_full_drops: u64,
    /// Allocations whose stack could not be stored (attributed to their direct caller only).
    pub stack_failures: u64,
    /// Frees of addresses not recorded (allocated before attaching, or dropped).
    pub unknown_frees: u64,
    pub nested_calls: u64,
    pub inflight_full: u64,
    pub stack_totals_full: u64,
    pub orphan_returns: u64,
    pub read_faults: u64,
    #[serde(default)]
    pub exit_stops: u64,
    /// Allocator calls whose return probe never ran (the allocation was not recorded).
    #[serde(default)]
    pub lost_returns: u64,
    /// Probe runs the kernel skipped (another BPF program was running on that CPU).
    #[serde(default)]
    pub missed_probe_runs: u64,
    /// Frames walked with frame pointers because no unwind table covered them.
    #[serde(default)]
    pub unwind_no_table: u64,
    /// Stack walks stopped by an unwind rule the kernel half cannot evaluate.
    #[serde(default)]
    pub unwind_bad_rule: u64,
    /// Stack walks stopped by an unreadable saved register or return address.
    #[serde(default)]
    pub unwind_read_fault: u64,
    /// Stacks truncated at the depth limit.
    #[serde(default)]
    pub unwind_depth_limit: u64,
    #[serde(default)]
    pub start_stops: u64,
    /// Allocations the byte sampler let pass (sampled tier).
    #[serde(default)]
    pub unsampled: u64,
    #[serde(default)]
    pub growth_events: u64,
    #[serde(default)]
    pub unmatched_unmaps: u64,
    #[serde(default)]
    pub growth_map_full: u64,
    /// Children held at their first page fault until their probes were attached.
    #[serde(default)]
    pub child_stops: u64,
    /// Releases seen again inside the release that made them, counted once.
    #[serde(default)]
    pub nested_frees: u64,
}

impl Counters {
    fn set(&mut self, c: Counter, v: u64) {
        let slot = match c {
            Counter::Allocs => &mut self.allocs,
            Counter::Frees => &mut self.frees,
            Counter::FailedAllocs => &mut self.failed_allocs,
            Counter::AllocMapFull => &mut self.map_full_drops,
            Counter::StackFailures => &mut self.stack_failures,
            Counter::UnknownFrees => &mut self.unknown_frees,
            Counter::Nested => &mut self.nested_calls,
            Counter::InflightFull => &mut self.inflight_full,
            Counter::StackTotalsFull => &mut self.stack_totals_full,
            Counter::OrphanReturns => &mut self.orphan_returns,
            Counter::ReadFaults => &mut self.read_faults,
            Counter::ExitStops => &mut self.exit_stops,
            Counter::LostReturns => &mut self.lost_returns,
            Counter::UnwindNoTable => &mut self.unwind_no_table,
            Counter::UnwindBadRule => &mut self.unwind_bad_rule,
            Counter::UnwindReadFault => &mut self.unwind_read_fault,
            Counter::UnwindDepthLimit => &mut self.unwind_depth_limit,
            Counter::StartStops => &mut self.start_stops,
            Counter::Unsampled => &mut self.unsampled,
            Counter::GrowthEvents => &mut self.growth_events,
            Counter::UnmatchedUnmaps => &mut self.unmatched_unmaps,
            Counter::GrowthMapFull => &mut self.growth_map_full,
            Counter::ChildStops => &mut self.child_stops,
            Counter::NestedFrees => &mut self.nested_frees,
        };
        *slot = v;
    }

    /// Events whose loss makes the reported totals lower bounds.
    pub fn lossy(&self) -> bool {
        self.map_full_drops + self.inflight_full + self.lost_returns + self.missed_probe_runs > 0
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

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall with a valid out-struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn map_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Ebpf(format!("reading {what}: {e}"))
}

fn map<'a>(tracer: &'a Tracer, name: &str) -> Result<&'a aya::maps::Map> {
    tracer
        .ebpf
        .map(name)
        .ok_or_else(|| Error::Ebpf(format!("map {name} missing from the object")))
}

/// Sums the per-CPU counters.
pub fn counters(tracer: &Tracer) -> Result<Counters> {
    let arr: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map(tracer, "COUNTERS")?).map_err(|e| map_err("COUNTERS", e))?;
    let mut out = Counters::default();
    for c in Counter::ALL {
        let values = arr
            .get(&(c as u32), 0)
            .map_err(|e| map_err("COUNTERS", e))?;
        out.set(c, values.iter().sum());
    }
    Ok(out)
}

/// Counters and outstanding bytes (from the per-stack totals) of process `tgid`.
pub fn status(tracer: &Tracer, tgid: u32) -> Result<Status> {
    let totals: PerCpuHashMap<&MapData, StackKey, StackTotals> =
        PerCpuHashMap::try_from(map(tracer, "STACK_TOTALS")?)
            .map_err(|e| map_err("STACK_TOTALS", e))?;
    let mut outstanding: i64 = 0;
    for item in totals.iter() {
        let Ok((key, values)) = item else { continue };
        if key.tgid != tgid {
            continue;
        }
        for v in values.iter() {
            outstanding += v.alloc_bytes as i64 - v.free_bytes as i64;
        }
    }
    Ok(Status {
        counters: counters(tracer)?,
        outstanding_bytes: outstanding,
    })
}

/// Reads every live allocation of `tgid` and the stacks they reference.
pub fn snapshot(tracer: &Tracer, tgid: u32) -> Result<Snapshot> {
    let taken_ns = monotonic_ns();
    let allocs_map: BpfHashMap<&MapData, AllocKey, AllocInfo> =
        BpfHashMap::try_from(map(tracer, "ALLOCS")?).map_err(|e| map_err("ALLOCS", e))?;
    let mut allocs = Vec::new();
    // The kernel's key-by-key walk of a hash map restarts from the first bucket when the key it
    // continues from was deleted meanwhile (a free, in a live process): entries already read
    // come again, and would be counted twice.
    let mut seen = std::collections::HashSet::new();
    for item in allocs_map.iter() {
        // An entry deleted while iterating is simply skipped.
        let Ok((key, info)) = item else { continue };
        if key.tgid != tgid || !seen.insert(key.addr) {
            continue;
        }
        allocs.push(LiveAlloc {
            addr: key.addr,
            size: info.size,
            ts_ns: info.ts_ns,
            stack_id: info.stack.stack_id,
            ret_addr: info.stack.ret_addr,
            kind: AllocKind::from_u32(info.kind),
            tid: info.tid,
            interval: info.interval,
        });
    }
    // An exec released everything the old image held, with no free to see.
    let execs: BpfHashMap<&MapData, u32, u64> =
        BpfHashMap::try_from(map(tracer, "EXECS")?).map_err(|e| map_err("EXECS", e))?;
    let exec_ns = execs.get(&tgid, 0).ok();
    if let Some(exec_ns) = exec_ns {
        let before = allocs.len();
        allocs.retain(|a| a.ts_ns > exec_ns);
        tracing::debug!(
            tgid,
            released = before - allocs.len(),
            "exec released the old image"
        );
    }
    let growth_map: PerCpuHashMap<&MapData, StackKey, GrowthTotals> =
        PerCpuHashMap::try_from(map(tracer, "GROWTH")?).map_err(|e| map_err("GROWTH", e))?;
    let mut growth = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in growth_map.iter() {
        let Ok((key, values)) = item else { continue };
        if key.tgid != tgid || !seen.insert((key.stack_id, key.ret_addr)) {
            continue;
        }
        let mut g = StackGrowth {
            stack_id: key.stack_id,
            ret_addr: key.ret_addr,
            ..StackGrowth::default()
        };
        for v in values.iter() {
            g.mapped += v.mapped;
            g.unmapped += v.unmapped;
            g.faulted += v.faulted;
            g.events += v.events;
        }
        growth.push(g);
    }
    // Anonymous regions mapped while traced and still mapped.
    let regions_map: BpfHashMap<&MapData, AllocKey, MmapRegion> =
        BpfHashMap::try_from(map(tracer, "REGIONS")?).map_err(|e| map_err("REGIONS", e))?;
    let mut regions = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in regions_map.iter() {
        let Ok((key, r)) = item else { continue };
        if key.tgid != tgid || !seen.insert(key.addr) {
            continue;
        }
        regions.push(LiveAlloc {
            addr: key.addr,
            size: r.len,
            ts_ns: r.ts_ns,
            stack_id: r.stack.stack_id,
            ret_addr: r.stack.ret_addr,
            kind: None,
            tid: 0,
            interval: 0,
        });
    }
    if let Some(exec_ns) = exec_ns {
        regions.retain(|r| r.ts_ns > exec_ns);
    }
    let stacks_map: BpfHashMap<&MapData, u64, StackFrames> =
        BpfHashMap::try_from(map(tracer, "STACKS")?).map_err(|e| map_err("STACKS", e))?;
    let mut stacks = HashMap::new();
    let ids = allocs
        .iter()
        .chain(&regions)
        .map(|a| a.stack_id)
        .chain(growth.iter().map(|g| g.stack_id));
    for id in ids {
        if id == 0 || stacks.contains_key(&id) {
            continue;
        }
        if let Ok(s) = stacks_map.get(&id, 0) {
            let len = (s.len as usize).min(s.frames.len());
            stacks.insert(
                id,
                RawStack {
                    frames: s.frames[..len].to_vec(),
                    truncated: s.flags & STACK_TRUNCATED != 0,
                },
            );
        }
    }
    allocs.sort_by_key(|a| (a.ts_ns, a.addr));
    regions.sort_by_key(|a| (a.ts_ns, a.addr));
    growth.sort_by_key(|g| (g.stack_id, g.ret_addr));
    Ok(Snapshot {
        allocs,
        regions,
        growth,
        stacks,
        counters: counters(tracer)?,
        taken_ns,
    })
}
