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
        snapshot::{LiveAlloc, RawStack, Snapshot, StackAllocated, StackGrowth, Status},
        timeline::StackHeld,
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

/// What each stack of `tgid` holds now, from the per-stack totals alone (allocated less
/// freed, as estimated from the samples' weights when sampling): cheap enough for every tick
/// of a timeline, where a [`snapshot`] reads every live allocation.
pub fn held_by_stack(tracer: &Tracer, tgid: u32) -> Result<Vec<StackHeld>> {
    let totals: PerCpuHashMap<&MapData, StackKey, StackTotals> =
        PerCpuHashMap::try_from(open(tracer, map::STACK_TOTALS)?)
            .map_err(|e| map_err(map::STACK_TOTALS, e))?;
    let mine = |k: &StackKey| k.tgid == tgid;
    let mut out = Vec::new();
    for (key, values) in once_each(totals.iter(), mine, |k| (k.stack_id, k.ret_addr)) {
        let (mut bytes, mut milli) = (0i128, 0i128);
        for v in values.iter() {
            bytes += v.est_bytes as i128 - v.est_free_bytes as i128;
            milli += v.est_objects_milli as i128 - v.est_free_objects_milli as i128;
        }
        // Per CPU, a free may be counted where its allocation is not: only the sum counts.
        out.push(StackHeld {
            stack_id: key.stack_id,
            ret_addr: key.ret_addr,
            bytes: bytes.max(0) as f64,
            count: milli.max(0) as f64 / 1000.0,
        });
    }
    Ok(out)
}

/// The entries of a key-by-key walk of a kernel hash map that `mine` keeps, each `id` once.
/// The walk restarts from the first bucket when the key it continues from was deleted
/// meanwhile (a free, in a live process): entries already read come again, and would be
/// counted twice. An entry deleted while walking (an error) is skipped.
fn once_each<K, V, E, I: std::hash::Hash + Eq>(
    walk: impl IntoIterator<Item = std::result::Result<(K, V), E>>,
    mine: impl Fn(&K) -> bool,
    id: impl Fn(&K) -> I,
) -> impl Iterator<Item = (K, V)> {
    let mut seen = std::collections::HashSet::new();
    walk.into_iter()
        .filter_map(|item| item.ok())
        .filter(move |(k, _)| mine(k) && seen.insert(id(k)))
}

/// Reads every live allocation of `tgid` and the stacks they reference.
pub fn snapshot(tracer: &Tracer, tgid: u32) -> Result<Snapshot> {
    let taken_ns = monotonic_ns();
    let allocs_map: BpfHashMap<&MapData, AllocKey, AllocInfo> =
        BpfHashMap::try_from(open(tracer, map::ALLOCS)?).map_err(|e| map_err(map::ALLOCS, e))?;
    let mut allocs = Vec::new();
    for (key, info) in once_each(allocs_map.iter(), |k| k.tgid == tgid, |k| k.addr) {
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
    let mine = |k: &StackKey| k.tgid == tgid;
    for (key, values) in once_each(growth_map.iter(), mine, |k| (k.stack_id, k.ret_addr)) {
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
    for (key, r) in once_each(regions_map.iter(), |k| k.tgid == tgid, |k| k.addr) {
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
    // What each stack allocated, freed or not.
    let totals: PerCpuHashMap<&MapData, StackKey, StackTotals> =
        PerCpuHashMap::try_from(open(tracer, map::STACK_TOTALS)?)
            .map_err(|e| map_err(map::STACK_TOTALS, e))?;
    let mut allocated = Vec::new();
    for (key, values) in once_each(totals.iter(), mine, |k| (k.stack_id, k.ret_addr)) {
        let mut a = StackAllocated {
            stack_id: key.stack_id,
            ret_addr: key.ret_addr,
            ..StackAllocated::default()
        };
        let (mut objects_milli, mut freed_milli) = (0u64, 0u64);
        for v in values.iter() {
            a.recorded += v.alloc_count;
            a.recorded_bytes += v.alloc_bytes;
            a.bytes += v.est_bytes as f64;
            a.freed_bytes += v.est_free_bytes as f64;
            objects_milli += v.est_objects_milli;
            freed_milli += v.est_free_objects_milli;
            for (sum, n) in a.lifetimes.iter_mut().zip(v.lifetimes) {
                *sum += n;
            }
        }
        a.count = objects_milli as f64 / 1000.0;
        a.freed_count = freed_milli as f64 / 1000.0;
        if a.recorded > 0 {
            allocated.push(a);
        }
    }
    let stacks_map: BpfHashMap<&MapData, u64, StackFrames> =
        BpfHashMap::try_from(open(tracer, map::STACKS)?).map_err(|e| map_err(map::STACKS, e))?;
    let mut stacks = HashMap::new();
    let ids = allocs
        .iter()
        .chain(&regions)
        .map(|a| a.stack_id)
        .chain(growth.iter().map(|g| g.stack_id))
        .chain(allocated.iter().map(|a| a.stack_id));
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
    allocated.sort_by_key(|a| (a.stack_id, a.ret_addr));
    Ok(Snapshot {
        allocs,
        regions,
        growth,
        allocated,
        stacks,
        counters: counters(tracer)?,
        taken_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A walk that restarted after a delete (keys 1 and 2 again), with an entry gone meanwhile
    /// and another process's entry: each of ours once, in walk order.
    #[test]
    fn a_restarted_walk_counts_each_entry_once() {
        type Entry = std::result::Result<((u32, u64), u64), &'static str>;
        let walk: Vec<Entry> = vec![
            Ok(((7, 1), 10)),
            Ok(((7, 2), 20)),
            Err("deleted while walking"),
            Ok(((7, 1), 10)),
            Ok(((8, 3), 30)),
            Ok(((7, 2), 20)),
            Ok(((7, 4), 40)),
        ];
        let got: Vec<u64> = once_each(walk, |k| k.0 == 7, |k| k.1)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(got, [10, 20, 40]);
    }
}
