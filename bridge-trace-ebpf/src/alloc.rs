//! Allocation: one entry program per argument layout (each a one-line wrapper over
//! [`alloc_enter`]) and one return probe, [`alloc_return`], that records the block.
use aya_ebpf::{helpers::*, macros::*, programs::*};
use bridge_trace_common::*;

use crate::{
    free::{credit_free, nested_frees, take},
    helpers::*,
    maps::*,
    stack::{capture_stack, NO_TOTALS},
};

#[inline(always)]
pub(crate) fn alloc_enter(ctx: &ProbeContext, kind: AllocKind, size: u64, ptr_arg: u64) -> u32 {
    guarded(|| remember_call(ctx, kind, size, ptr_arg))
}

#[inline(always)]
fn remember_call(ctx: &ProbeContext, kind: AllocKind, size: u64, ptr_arg: u64) -> u32 {
    let (tgid, tid) = current_task();
    // SAFETY: the context's registers are valid for the duration of the program.
    let regs = unsafe { &*ctx.regs };
    let sp = regs.rsp;
    match pending_call(tid, sp) {
        Pending::Outer(outer) => {
            // e.g. glibc's memalign calling malloc: the outer call is the one the program made.
            // SAFETY: pointer from a successful map lookup.
            unsafe { (*outer).depth += 1 };
            count(Counter::Nested);
            return 0;
        }
        // Replaced below by this call's entry.
        Pending::Stale => count(Counter::LostReturns),
        Pending::None => {}
    }
    let interval = sample_interval();
    // Every allocation, or a sample with the bytes it stands for.
    let interval = if interval == 0 {
        0
    } else if let Some(weight) = sampled(size, interval) {
        WEIGHTED | weight.min(WEIGHTED - 1)
    } else {
        count(Counter::Unsampled);
        if resizes(kind) && ptr_arg != 0 {
            // The old block may be a sampled one: its return forgets it if it moved.
            let mut call = InFlight {
                size,
                ptr_arg,
                sp,
                kind: kind as u32,
                interval: NOT_SAMPLED,
                ..InFlight::default()
            };
            hold_old(tgid, tid, &mut call);
        }
        return 0;
    };
    let stack = capture_stack(NO_TOTALS, tgid, regs.rip, sp, regs.rbp, true);
    let mut call = InFlight {
        size,
        ptr_arg,
        sp,
        stack,
        kind: kind as u32,
        depth: 0,
        interval,
        ..InFlight::default()
    };
    if resizes(kind) && ptr_arg != 0 {
        hold_old(tgid, tid, &mut call);
    } else if INFLIGHT.insert(tid, &call, 0).is_err() {
        count(Counter::InflightFull);
    }
    0
}

#[inline(always)]
fn resizes(kind: AllocKind) -> bool {
    matches!(kind, AllocKind::Realloc | AllocKind::Reallocarray)
}

/// A realloc's entry takes its old block out of the live set before the allocator can free
/// it and hand its address to another thread; the return credits it or puts it back.
#[inline(always)]
fn hold_old(tgid: u32, tid: u32, call: &mut InFlight) {
    if let Some(old) = take(tgid, call.ptr_arg) {
        call.old = old;
        call.holds_old = 1;
    }
    if INFLIGHT.insert(tid, &*call, 0).is_err() {
        count(Counter::InflightFull);
        // Untracked call: the block stays live, as if the realloc had not been seen.
        put_back(tgid, call);
    }
}

/// A realloc that left its old block where it was (failed, or an unsampled one in place).
#[inline(always)]
fn put_back(tgid: u32, call: &InFlight) {
    if call.holds_old != 0
        && ALLOCS
            .insert(&AllocKey::new(tgid, call.ptr_arg), &call.old, 0)
            .is_err()
    {
        count(Counter::AllocMapFull);
    }
}

/// A realloc that released its old block (moved it, grew or shrank it, or freed it).
#[inline(always)]
fn credit_old(call: &InFlight) {
    if call.holds_old != 0 {
        credit_free(&call.old);
    }
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Malloc, arg(&ctx, 0), 0)
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    let (n, size) = (arg(&ctx, 0), arg(&ctx, 1));
    // An overflowing product makes calloc fail; record it as such (size is then irrelevant).
    alloc_enter(&ctx, AllocKind::Calloc, mul_or_max(n, size), 0)
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Realloc, arg(&ctx, 1), arg(&ctx, 0))
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    let (n, size) = (arg(&ctx, 1), arg(&ctx, 2));
    let total = mul_or_max(n, size);
    alloc_enter(&ctx, AllocKind::Reallocarray, total, arg(&ctx, 0))
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::PosixMemalign, arg(&ctx, 2), arg(&ctx, 0))
}

#[uprobe]
pub fn aligned_alloc_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::AlignedAlloc, arg(&ctx, 1), 0)
}

#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Memalign, arg(&ctx, 1), 0)
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Valloc, arg(&ctx, 0), 0)
}

#[uprobe]
pub fn xallocx_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Xallocx, arg(&ctx, 1), arg(&ctx, 0))
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Pvalloc, arg(&ctx, 0), 0)
}

#[inline(always)]
pub(crate) fn record(tgid: u32, tid: u32, addr: u64, size: u64, call: &InFlight) {
    let key = AllocKey::new(tgid, addr);
    let info = AllocInfo {
        size,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        stack: call.stack,
        kind: call.kind,
        tid,
        interval: call.interval,
    };
    if nested_frees() {
        // A block this thread releases next is a new one, even at the same address.
        let _ = RELEASING.remove(&tid);
    }
    if ALLOCS.insert(&key, &info, 0).is_err() {
        count(Counter::AllocMapFull);
        return;
    }
    count(Counter::Allocs);
    let (est, est_objects_milli) = estimate(size, call.interval);
    credit(&call.stack, |t| {
        t.alloc_bytes += size;
        t.alloc_count += 1;
        t.est_bytes += est;
        t.est_objects_milli += est_objects_milli;
    });
}

/// Adds to `stack`'s running totals with `add`: in place, or on a zeroed first entry built in
/// [`TOTALS_SCRATCH`] and inserted from there; a full map is counted.
#[inline(always)]
pub(crate) fn credit(stack: &StackKey, add: impl FnOnce(&mut StackTotals)) {
    if let Some(t) = STACK_TOTALS.get_ptr_mut(stack) {
        // SAFETY: per-CPU value of a successful lookup, this program's while it runs.
        add(unsafe { &mut *t });
        return;
    }
    let Some(t) = TOTALS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, exclusive while the program runs.
    let t = unsafe { &mut *t };
    *t = StackTotals::default();
    add(t);
    if STACK_TOTALS.insert(stack, t, 0).is_err() {
        count(Counter::StackTotalsFull);
    }
}

/// What an allocation of `size` recorded with `interval` stands for among the allocations:
/// (bytes, allocations in thousandths) — itself, or its sample's weight.
#[inline(always)]
pub(crate) fn estimate(size: u64, interval: u64) -> (u64, u64) {
    let est = if interval & WEIGHTED != 0 && interval != NOT_SAMPLED {
        interval & !WEIGHTED
    } else {
        size
    };
    let objects_milli = if size == 0 {
        1000
    } else {
        // Bounded first (1 PiB): no 128-bit product on this target.
        est.min(1 << 50) * 1000 / size
    };
    (est, objects_milli)
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    guarded(|| record_return(&ctx))
}

#[inline(always)]
fn record_return(ctx: &RetProbeContext) -> u32 {
    let (tgid, tid) = current_task();
    let Some(p) = INFLIGHT.get_ptr_mut(tid) else {
        // When sampling, the calls the sampler skipped have no entry.
        if sample_interval() == 0 {
            count(Counter::OrphanReturns);
        }
        return 0;
    };
    // SAFETY: pointer from a successful map lookup.
    let call = unsafe { &mut *p };
    if call.depth > 0 {
        // The return of a nested call: the outer call's return does the accounting.
        call.depth -= 1;
        return 0;
    }
    let call = *call;
    let _ = INFLIGHT.remove(tid);
    let ret: u64 = ctx.ret();
    let Some(kind) = AllocKind::from_u32(call.kind) else {
        return 0;
    };
    if call.interval == NOT_SAMPLED {
        // A realloc the sampler skipped: only its old block matters, if it moved or was freed.
        if ret != call.ptr_arg && (ret != 0 || call.size == 0) {
            credit_old(&call);
        } else {
            put_back(tgid, &call);
        }
        return 0;
    }
    match kind {
        AllocKind::Realloc | AllocKind::Reallocarray => {
            if ret != 0 {
                credit_old(&call);
                record(tgid, tid, ret, call.size, &call);
            } else if call.size == 0 && kind == AllocKind::Realloc {
                // realloc(p, 0) frees p and returns NULL.
                credit_old(&call);
            } else {
                // Failure: the old block is untouched.
                put_back(tgid, &call);
                count(Counter::FailedAllocs);
            }
        }
        AllocKind::PosixMemalign => {
            if ret as u32 != 0 {
                count(Counter::FailedAllocs);
                return 0;
            }
            // SAFETY: fault-tolerant read of the caller's out-pointer.
            match unsafe { bpf_probe_read_user(call.ptr_arg as *const u64) } {
                Ok(addr) if addr != 0 => record(tgid, tid, addr, call.size, &call),
                _ => count(Counter::ReadFaults),
            }
        }
        AllocKind::Xallocx => {
            // The real size it returns is at least the size asked for when the block grew or
            // shrank in place; otherwise the block is as it was.
            if ret >= call.size {
                resize(tgid, call.ptr_arg, call.size);
            } else {
                count(Counter::FailedAllocs);
            }
        }
        AllocKind::Pvalloc => {
            if ret == 0 {
                count(Counter::FailedAllocs);
                return 0;
            }
            // pvalloc rounds the size up to whole pages (and allocates one page for 0).
            let size = if call.size == 0 {
                PAGE_SIZE
            } else {
                call.size.div_ceil(PAGE_SIZE) * PAGE_SIZE
            };
            record(tgid, tid, ret, size, &call);
        }
        _ => {
            if ret == 0 {
                count(Counter::FailedAllocs);
                return 0;
            }
            record(tgid, tid, ret, call.size, &call);
        }
    }
    0
}

/// A live allocation resized in place: its new size, and its stack's totals moved by the
/// difference.
#[inline(always)]
pub(crate) fn resize(tgid: u32, addr: u64, size: u64) {
    let key = AllocKey::new(tgid, addr);
    let Some(info) = ALLOCS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: pointer from a successful map lookup.
    let (old, stack) = unsafe { ((*info).size, (*info).stack) };
    // SAFETY: as above.
    unsafe { (*info).size = size };
    if let Some(t) = STACK_TOTALS.get_ptr_mut(&stack) {
        // SAFETY: per-CPU value of a successful lookup.
        unsafe {
            if size > old {
                (*t).alloc_bytes += size - old;
            } else {
                (*t).free_bytes += old - size;
            }
        }
    }
}
