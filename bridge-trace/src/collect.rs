//! The only reader of the kernel maps: turns them into an owned [`Snapshot`] (and the live
//! [`Status`]); no aya type goes beyond this module.
use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use bridge_trace_common::names::map;
use bridge_trace_common::{
    AllocInfo, AllocKey, AllocKind, GrowthTotals, MmapRegion, StackFrames, StackKey, StackTotals,
    STACK_TRUNCATED,
};

use crate::{
    attach::Tracer,
    error::{Error, Result},
    model::{
        counters::Counters,
        snapshot::{LiveAlloc, RawStack, Snapshot, StackGrowth, Status},
    },
    os::monotonic_ns,
};

fn map_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Ebpf(format!("reading {what}: {e}"))
}

fn open<'a>(tracer: &'a Tracer, name: &str) -> Result<&'a aya::maps::Map> {
    tracer
        .ebpf
        .map(name)
        .ok_or_else(|| Error::Ebpf(format!("map {name} missing from the object")))
}

/// Sums the per-CPU counters.
pub fn counters(tracer: &Tracer) -> Result<Counters> {
    let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(open(tracer, map::COUNTERS)?)
        .map_err(|e| map_err(map::COUNTERS, e))?;
    let mut out = Counters::default();
    let mut failed = None;
    out.set_from_kernel(|c| match arr.get(&(c as u32), 0) {
        Ok(values) => values.iter().sum(),
        Err(e) => {
            failed.get_or_insert(map_err(map::COUNTERS, e));
            0
        }
    });
    failed.map_or(Ok(out), Err)
}

/// Counters and outstanding bytes (from the per-stack totals) of process `tgid`.
pub fn status(tracer: &Tracer, tgid: u32) -> Result<Status> {
    let totals: PerCpuHashMap<&MapData, StackKey, StackTotals> =
        PerCpuHashMap::try_from(open(tracer, map::STACK_TOTALS)?)
            .map_err(|e| map_err(map::STACK_TOTALS, e))?;
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
        BpfHashMap::try_from(open(tracer, map::ALLOCS)?).map_err(|e| map_err(map::ALLOCS, e))?;
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
        BpfHashMap::try_from(open(tracer, map::EXECS)?).map_err(|e| map_err(map::EXECS, e))?;
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
        PerCpuHashMap::try_from(open(tracer, map::GROWTH)?).map_err(|e| map_err(map::GROWTH, e))?;
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
        BpfHashMap::try_from(open(tracer, map::REGIONS)?).map_err(|e| map_err(map::REGIONS, e))?;
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
        BpfHashMap::try_from(open(tracer, map::STACKS)?).map_err(|e| map_err(map::STACKS, e))?;
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
