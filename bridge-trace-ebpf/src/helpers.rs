//! What every probe family uses: counting, the current task, the sampler, the in-flight
//! entry of a thread, and reading arguments.
use aya_ebpf::{helpers::*, programs::*, EbpfContext as _};
use bridge_trace_common::*;

use crate::maps::*;

/// The signal that holds a target (`bpf_send_signal`), as Linux numbers it on x86-64.
pub(crate) const SIGSTOP: u32 = 19;

#[inline(always)]
pub(crate) fn knob(k: &'static u32) -> u32 {
    // SAFETY: a read of a global; volatile so that the value set at load time is used.
    unsafe { core::ptr::read_volatile(k) }
}

/// Runs a program's body unless another guarded program is running on this CPU (preempted in
/// the middle of its run: programs run with migration, not preemption, disabled). The kernel
/// guards perf-event uprobes itself, but not multi-uprobe links or tracepoints, and the
/// programs share per-CPU scratch state (the stack walk, the sampler, the counters).
/// Interleavings on one CPU are whole preemptions, so a plain flag suffices: a run that sees
/// it clear and is preempted before setting it resumes only after the other run cleared it.
#[inline(always)]
pub(crate) fn guarded(body: impl FnOnce() -> u32) -> u32 {
    let Some(busy) = BUSY.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot of a successful lookup.
    unsafe {
        if *busy != 0 {
            count(Counter::BusyCpu);
            return 0;
        }
        *busy = 1;
    }
    let r = body();
    // SAFETY: as above (the program has not migrated).
    unsafe { *busy = 0 };
    r
}

#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// (tgid, tid) of the current task, for the allocator probes' hot path. Those probes need no
/// [`TARGETS`] lookup: their links are attached per process (`UProbeScope::OneProcess`), and
/// the kernel runs a per-process uprobe only for tasks sharing that process's memory (its
/// threads; a forked child has its own), and user space detaches them before it forgets a
/// target.
#[inline(always)]
pub(crate) fn current_task() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// Returns (tgid, tid) when the current task belongs to a target.
#[inline(always)]
pub(crate) fn current_target() -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: the value is not kept.
    unsafe { TARGETS.get(&tgid) }?;
    Some((tgid, pid_tgid as u32))
}

/// The mean sampling interval in bytes; 0 when every allocation is recorded.
#[inline(always)]
pub(crate) fn sample_interval() -> u64 {
    CONFIG.get(config::SAMPLE_INTERVAL).copied().unwrap_or(0)
}

/// Whether an allocation of `size` bytes is sampled: a Poisson process over allocated bytes with
/// mean `interval` (as jemalloc and tcmalloc sample), so an allocation is sampled with
/// probability 1 - exp(-size / interval), which the user half inverts into its estimate of
/// what is held. A sampled allocation comes with the bytes it stands for among those
/// allocated: `interval` for the sample point it reached, plus the rest of the block past that
/// point (where the further points are expected to fall one per `interval`), an unbiased
/// estimate that needs no exponential here.
#[inline(always)]
pub(crate) fn sampled(size: u64, interval: u64) -> Option<u64> {
    let Some(left) = SAMPLER.get_ptr_mut(0) else {
        return Some(size);
    };
    // SAFETY: per-CPU slot, exclusive while the program runs.
    let left = unsafe { &mut *left };
    let first = *left == 0;
    if !first && *left > size {
        *left -= size;
        return None;
    }
    // SAFETY: plain helper call.
    let i = unsafe { bpf_get_prandom_u32() } & (EXP_QUANTILES - 1);
    let q = EXP_TABLE.get(i).copied().unwrap_or(1 << EXP_QUANTILE_SHIFT) as u64;
    // Memoryless: the distance from here to the next sample point is a fresh draw.
    let next = ((q * interval) >> EXP_QUANTILE_SHIFT).max(1);
    // Where in this block the sample point is.
    let reached = if first {
        if next > size {
            *left = next - size;
            return None;
        }
        next
    } else {
        *left
    };
    *left = next;
    Some(interval + (size - reached))
}

/// What this thread's in-flight entry, if any, means for a call entering at `sp`.
pub(crate) enum Pending {
    /// No allocator call in progress on this thread.
    None,
    /// A call still running further up this stack: the new call is nested in it.
    Outer(*mut InFlight),
    /// An entry whose return never ran (a missed return probe, or a thread that died inside
    /// the allocator): its allocation is lost.
    Stale,
}

#[inline(always)]
pub(crate) fn pending_call(tid: u32, sp: u64) -> Pending {
    let Some(p) = INFLIGHT.get_ptr_mut(tid) else {
        return Pending::None;
    };
    // SAFETY: pointer from a successful map lookup.
    let outer_sp = unsafe { (*p).sp };
    // Equal stack pointers: the outer call tail-called this one (glibc's reallocarray jumps to
    // realloc, aligned_alloc to malloc); its return address on the stack is already the outer
    // call's uretprobe trampoline, so the outer call's stack and return are the ones to keep.
    if outer_sp >= sp && outer_sp - sp < NESTING_WINDOW {
        Pending::Outer(p)
    } else {
        Pending::Stale
    }
}

/// Integer argument `n` of the probed call: in its ABI register, or where the probe's cookie
/// says the function had copied it by the probe's place ([`ARG_COOKIE_BITS`]).
#[inline(always)]
pub(crate) fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let slot = (cookie >> (ARG_COOKIE_BITS as usize * n)) & ((1 << ARG_COOKIE_BITS) - 1);
    if slot == 0 {
        return ctx.arg::<u64>(n).unwrap_or(0);
    }
    // A copy of the registers: the verifier allows only constant offsets into the context,
    // which a match over the slots would otherwise become.
    // SAFETY: the context's registers are valid for the duration of the program.
    let regs = unsafe { core::ptr::read_volatile(ctx.regs) };
    // Not [`register`]: each arm is a branch the verifier walks with the stack walk after it,
    // and the entry programs read up to three arguments.
    match slot - 1 {
        pt_regs_slot::R15 => regs.r15,
        pt_regs_slot::R14 => regs.r14,
        pt_regs_slot::R13 => regs.r13,
        pt_regs_slot::R12 => regs.r12,
        pt_regs_slot::RBX => regs.rbx,
        pt_regs_slot::R11 => regs.r11,
        pt_regs_slot::R10 => regs.r10,
        pt_regs_slot::R9 => regs.r9,
        pt_regs_slot::R8 => regs.r8,
        pt_regs_slot::RAX => regs.rax,
        pt_regs_slot::RCX => regs.rcx,
        pt_regs_slot::RDX => regs.rdx,
        pt_regs_slot::RSI => regs.rsi,
        pt_regs_slot::RDI => regs.rdi,
        _ => 0,
    }
}

/// `a * b`, or `u64::MAX` on overflow (`checked_mul` needs a 128-bit multiply BPF lacks).
#[inline(always)]
pub(crate) fn mul_or_max(a: u64, b: u64) -> u64 {
    if (a | b) >> 32 == 0 {
        return a * b;
    }
    if a == 0 {
        return 0;
    }
    // The volatile read keeps LLVM from turning this back into a 128-bit multiply.
    let limit = u64::MAX / a;
    // SAFETY: a read of a local.
    let limit = unsafe { core::ptr::read_volatile(&limit) };
    if b > limit {
        u64::MAX
    } else {
        a * b
    }
}

pub(crate) const PAGE_SIZE: u64 = 4096;
