//! Release: `free` and its kin forget a live block and credit its stack, once even when one
//! release calls another (a C++ `operator delete` ending in `free`).
use aya_ebpf::{helpers::*, macros::*, programs::*};
use bridge_trace_common::*;

use crate::{
    alloc::{credit, estimate},
    helpers::*,
    maps::*,
};

/// Whether release functions may nest ([`config::NESTED_FREES`]).
#[inline(always)]
pub(crate) fn nested_frees() -> bool {
    CONFIG.get(config::NESTED_FREES).copied().unwrap_or(0) != 0
}

/// Forgets a live allocation and credits its stack. Returns false when the address is unknown,
/// counted when `count_unknown` and not sampling (where most addresses are unknown by design).
#[inline(always)]
pub(crate) fn release(tgid: u32, addr: u64, count_unknown: bool) -> bool {
    let Some(info) = take(tgid, addr) else {
        if count_unknown && sample_interval() == 0 {
            count(Counter::UnknownFrees);
        }
        return false;
    };
    credit_free(&info);
    true
}

/// Takes a live allocation out of the live set, uncredited (a realloc's old block until the
/// realloc returns: [`credit_free`] then, or put back if it failed).
#[inline(always)]
pub(crate) fn take(tgid: u32, addr: u64) -> Option<AllocInfo> {
    let key = AllocKey::new(tgid, addr);
    // SAFETY: value copied out before the delete.
    let info = (unsafe { ALLOCS.get(&key) }).copied()?;
    let _ = ALLOCS.remove(&key);
    Some(info)
}

/// Credits a released block to its stack's totals.
#[inline(always)]
pub(crate) fn credit_free(info: &AllocInfo) {
    count(Counter::Frees);
    let (est, est_objects_milli) = estimate(info.size, info.interval);
    // SAFETY: plain helper call.
    let lived = unsafe { bpf_ktime_get_ns() }.saturating_sub(info.ts_ns);
    let bucket = lifetime_bucket(lived);
    credit(&info.stack, |t| {
        t.free_bytes += info.size;
        t.free_count += 1;
        t.est_free_bytes += est;
        t.est_free_objects_milli += est_objects_milli;
        t.lifetimes[bucket] += 1;
    });
}

/// The [`StackTotals::lifetimes`] bucket of a block that lived `ns` nanoseconds.
#[inline(always)]
fn lifetime_bucket(ns: u64) -> usize {
    let mut i = 0;
    while i < LIFETIME_BOUNDS_NS.len() && ns >= LIFETIME_BOUNDS_NS[i] {
        i += 1;
    }
    i & (LIFETIME_BUCKETS - 1)
}

/// [`release`] for a free probed at its entry (where `[sp]` is its return address: the
/// placement moves no probe past a stack-pointer change): an unknown address freed from inside
/// the allocator's own code is counted apart, as the allocator's own.
#[inline(always)]
fn release_or_count(tgid: u32, tid: u32, addr: u64, sp: u64) {
    if release(tgid, addr, false) || sample_interval() != 0 {
        return;
    }
    // SAFETY: the value is copied out.
    if let Some(call) = unsafe { INFLIGHT.get(&tid) }.copied() {
        if call.holds_old != 0 && call.ptr_arg == addr {
            // A realloc freeing its own old block (realloc(p, 0), a move): its return
            // credits the block, held since its entry.
            return;
        }
    }
    // SAFETY: the value is copied out.
    if let Some(parent) = unsafe { CHILD_OF.get(&tgid) }.copied() {
        // SAFETY: as above.
        if unsafe { ALLOCS.get(&AllocKey::new(parent, addr)) }.is_some() {
            count(Counter::InheritedFrees);
            return;
        }
    }
    // SAFETY: a read of the target's stack, checked by the helper.
    let ret: u64 = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    // SAFETY: the value is copied out.
    let inside = match unsafe { ALLOCATOR_TEXT.get(&tgid) } {
        Some(text) => {
            let mut found = false;
            for r in text.ranges.iter() {
                if ret >= r[0] && ret < r[1] {
                    found = true;
                }
            }
            found
        }
        None => false,
    };
    count(if inside {
        Counter::InternalFrees
    } else {
        Counter::UnknownFrees
    });
}

/// free: the map delete and the per-stack update, nothing else. A free the allocator makes
/// itself (glibc's `realloc(p, 0)` calls `free(p)`) releases the block here, and the realloc's
/// return then finds it gone ([`release`] with `count_unknown` false).
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    guarded(|| free_call(&ctx))
}

#[inline(always)]
fn free_call(ctx: &ProbeContext) -> u32 {
    let addr = arg(ctx, 0);
    if addr == 0 {
        return 0;
    }
    let (tgid, tid) = current_task();
    // SAFETY: the context's registers are valid for the duration of the program.
    let sp = unsafe { (*ctx.regs).rsp };
    if !nested_frees() {
        release_or_count(tgid, tid, addr, sp);
        return 0;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the value is copied out.
    if let Some(last) = unsafe { RELEASING.get(&tid) }.copied() {
        let deeper = last.sp >= sp && last.sp - sp < NESTING_WINDOW;
        if last.addr == addr && deeper && now.saturating_sub(last.ts_ns) < NESTED_FREE_NS {
            // The same block, released again inside the release that just released it.
            count(Counter::NestedFrees);
            return 0;
        }
    }
    release_or_count(tgid, tid, addr, sp);
    let last = Releasing {
        addr,
        sp,
        ts_ns: now,
    };
    let _ = RELEASING.insert(&tid, &last, 0);
    0
}
