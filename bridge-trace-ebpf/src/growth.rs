//! Heap growth (`watch --tier growth`, and what `record` reports the program mapped itself):
//! libc's brk/mmap/munmap/mremap wrappers and first-touch page faults, attributed to user stacks.
use aya_ebpf::{helpers::*, macros::*, programs::*};
use bridge_trace_common::*;

use crate::{
    helpers::*,
    maps::*,
    stack::{capture_stack, NO_TOTALS},
};

pub(crate) const SYS_MMAP: u64 = 9;
pub(crate) const SYS_MUNMAP: u64 = 11;
pub(crate) const SYS_BRK: u64 = 12;
pub(crate) const SYS_MREMAP: u64 = 25;
pub(crate) const MAP_ANONYMOUS: u64 = 0x20;
/// x86 page-fault error code: the page was present (a protection fault, not a first touch).
pub(crate) const PF_PROT: u64 = 1;

/// The user registers the page-fault tracepoint passes as a `struct pt_regs *`.
#[inline(always)]
pub(crate) fn user_regs(ptr: u64) -> Option<aya_ebpf::bindings::pt_regs> {
    // SAFETY: a fault-tolerant read of kernel memory.
    unsafe { bpf_probe_read_kernel(ptr as *const aya_ebpf::bindings::pt_regs) }.ok()
}

/// Adds growth to a stack's totals.
#[inline(always)]
pub(crate) fn grow(stack: &StackKey, mapped: u64, unmapped: u64, faulted: u64) {
    count(Counter::GrowthEvents);
    if let Some(t) = GROWTH.get_ptr_mut(stack) {
        // SAFETY: per-CPU value of a successful lookup.
        unsafe {
            (*t).mapped += mapped;
            (*t).unmapped += unmapped;
            (*t).faulted += faulted;
            (*t).events += 1;
        }
    } else {
        let t = GrowthTotals {
            mapped,
            unmapped,
            faulted,
            events: 1,
        };
        if GROWTH.insert(stack, &t, 0).is_err() {
            count(Counter::GrowthMapFull);
        }
    }
}

/// Entry of one of libc's heap-growth wrappers (`brk`, `mmap`, `munmap`, `mremap`, probed in
/// the traced processes only, so that nothing else on the machine pays): keeps the arguments
/// and the caller's stack until the return.
#[inline(always)]
pub(crate) fn growth_enter(ctx: &ProbeContext, nr: u64) -> u32 {
    guarded(|| remember_syscall(ctx, nr))
}

#[inline(always)]
fn remember_syscall(ctx: &ProbeContext, nr: u64) -> u32 {
    let Some((tgid, tid)) = current_target() else {
        return 0;
    };
    let args = [arg(ctx, 0), arg(ctx, 1), arg(ctx, 2), arg(ctx, 3)];
    if nr == SYS_MMAP && args[3] & MAP_ANONYMOUS == 0 {
        return 0;
    }
    // SAFETY: the context's registers are valid for the duration of the program.
    let regs = unsafe { &*ctx.regs };
    let call = PendingSyscall {
        nr,
        args,
        stack: capture_stack(NO_TOTALS, tgid, regs.rip, regs.rsp, regs.rbp, true),
    };
    if SYSCALLS.insert(tid, &call, 0).is_err() {
        count(Counter::InflightFull);
    }
    0
}

#[uprobe]
pub fn brk_enter(ctx: ProbeContext) -> u32 {
    growth_enter(&ctx, SYS_BRK)
}

#[uprobe]
pub fn mmap_enter(ctx: ProbeContext) -> u32 {
    growth_enter(&ctx, SYS_MMAP)
}

#[uprobe]
pub fn munmap_enter(ctx: ProbeContext) -> u32 {
    growth_enter(&ctx, SYS_MUNMAP)
}

#[uprobe]
pub fn mremap_enter(ctx: ProbeContext) -> u32 {
    growth_enter(&ctx, SYS_MREMAP)
}

pub(crate) const MAP_FAILED: u64 = u64::MAX;

/// Return of a heap-growth wrapper: turns the call into growth (or shrinkage) of its stack.
#[uretprobe]
pub fn growth_return(ctx: RetProbeContext) -> u32 {
    guarded(|| syscall_return(&ctx))
}

#[inline(always)]
fn syscall_return(ctx: &RetProbeContext) -> u32 {
    let Some((tgid, tid)) = current_target() else {
        return 0;
    };
    // SAFETY: value copied out before the delete.
    let Some(call) = (unsafe { SYSCALLS.get(&tid) }).copied() else {
        return 0;
    };
    let _ = SYSCALLS.remove(&tid);
    let ret: u64 = ctx.ret();
    match call.nr {
        SYS_BRK => {
            // brk(addr) returns 0 once the break is at addr; brk(0) only asks where it is.
            let now = call.args[0];
            if ret as u32 != 0 || now == 0 {
                return 0;
            }
            // SAFETY: value copied out.
            let before = unsafe { BREAKS.get(&tgid) }.copied();
            let _ = BREAKS.insert(&tgid, &now, 0);
            match before {
                Some(b) if now > b => grow(&call.stack, now - b, 0, 0),
                Some(b) if now < b => grow(&call.stack, 0, b - now, 0),
                _ => {}
            }
        }
        SYS_MMAP => {
            if ret != MAP_FAILED {
                map_region(tgid, ret, call.args[1], &call.stack);
            }
        }
        SYS_MUNMAP => {
            if ret as u32 == 0 {
                unmap(tgid, call.args[0], call.args[1]);
            }
        }
        _ => {
            // mremap(old, old_len, new_len, ...): the region moves to the caller's stack.
            if ret == MAP_FAILED {
                return 0;
            }
            let (old, old_len, new_len) = (call.args[0], call.args[1], call.args[2]);
            unmap(tgid, old, old_len);
            map_region(tgid, ret, new_len, &call.stack);
        }
    }
    0
}

/// Remembers a region the target mapped, and credits its stack with the growth.
#[inline(always)]
pub(crate) fn map_region(tgid: u32, addr: u64, len: u64, stack: &StackKey) {
    let key = AllocKey::new(tgid, addr);
    let region = MmapRegion {
        len,
        stack: *stack,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    if REGIONS.insert(&key, &region, 0).is_err() {
        count(Counter::GrowthMapFull);
    }
    grow(stack, len, 0, 0);
}

/// Gives back a region the target mapped while traced (whole regions only: a partial unmap is
/// counted as unmatched).
#[inline(always)]
pub(crate) fn unmap(tgid: u32, addr: u64, len: u64) {
    let key = AllocKey::new(tgid, addr);
    // SAFETY: value copied out before the delete.
    match unsafe { REGIONS.get(&key) }.copied() {
        Some(r) if r.len <= len => {
            let _ = REGIONS.remove(&key);
            grow(&r.stack, 0, r.len, 0);
        }
        _ => count(Counter::UnmatchedUnmaps),
    }
}

/// Every user page fault, system-wide: a target's first touch of a page is resident growth,
/// attributed to the code that touched it.
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    guarded(|| first_touch(&ctx)) as i32
}

#[inline(always)]
fn first_touch(ctx: &RawTracePointContext) -> u32 {
    // page_fault_user's arguments are (unsigned long address, struct pt_regs *regs,
    // unsigned long error_code).
    let error_code: u64 = ctx.arg(2);
    if error_code & PF_PROT != 0 {
        return 0;
    }
    let Some((tgid, _)) = current_target() else {
        return 0;
    };
    let Some(regs) = user_regs(ctx.arg(1)) else {
        return 0;
    };
    let stack = capture_stack(NO_TOTALS, tgid, regs.rip, regs.rsp, regs.rbp, false);
    grow(&stack, 0, 0, PAGE_SIZE);
    0
}
