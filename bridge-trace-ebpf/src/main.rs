//! The kernel half of bridge-trace: uprobes and uretprobes on the allocator's entry points that
//! keep, in kernel maps, every live allocation of the target process (address → size, stack,
//! time) and running totals per call stack.
//!
//! Every entry probe is a one-line wrapper over [`alloc_enter`]; one return probe,
//! [`alloc_return`], serves them all; [`free_enter`] handles `free`. The user half reads the maps;
//! only this file writes them (see the list below).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_send_signal},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use bridge_trace_common::{
    AllocInfo, AllocKey, AllocKind, Counter, InFlight, StackFrames, StackKey, StackTotals,
    COUNTER_COUNT, DEFAULT_MAX_ALLOCS, MAX_INFLIGHT, MAX_STACKS, MAX_STACK_DEPTH, NESTING_WINDOW,
    STACK_TRUNCATED,
};

// ---- Read-only knobs, set by the user half before load. ----

/// The process being traced (its tgid). Probes are also attached for this pid only; this check
/// keeps a stray event from another process out of the maps.
#[no_mangle]
static TARGET_TGID: u32 = 0;

/// 1: stop the target with SIGSTOP when it calls `_exit`, so that the user half (its parent, in
/// `-- CMD` mode) can read its memory maps before they disappear, then SIGCONT it.
#[no_mangle]
static STOP_AT_EXIT: u32 = 0;

// ---- Maps. Every map is written here only; the user half only reads (and sizes) them. ----

/// Live allocations: (tgid, address) → size, time, stack. Written by the return probe (insert)
/// and by `free`/realloc (delete).
#[map]
static ALLOCS: HashMap<AllocKey, AllocInfo> = HashMap::with_max_entries(DEFAULT_MAX_ALLOCS, 0);

/// Allocator calls in progress, per thread id: written by the entry probes, consumed by the
/// return probe.
#[map]
static INFLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Call stacks by hash of their frames: written once per distinct stack by the entry probes.
#[map]
static STACKS: HashMap<u64, StackFrames> = HashMap::with_max_entries(MAX_STACKS, 0);

/// Scratch space for walking a stack (too large for the 512-byte BPF stack).
#[map]
static SCRATCH: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);

/// Bytes and counts allocated and freed per stack, per CPU: written on every allocation and free.
#[map]
static STACK_TOTALS: PerCpuHashMap<StackKey, StackTotals> =
    PerCpuHashMap::with_max_entries(MAX_STACKS, 0);

/// Event and failure counters, per CPU, indexed by [`Counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

const SIGSTOP: u32 = 19;

#[inline(always)]
fn knob(k: &'static u32) -> u32 {
    // SAFETY: a read of a global; volatile so that the value set at load time is used.
    unsafe { core::ptr::read_volatile(k) }
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// Returns (tgid, tid) when the current task belongs to the target.
#[inline(always)]
fn current_target() -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid != knob(&TARGET_TGID) {
        return None;
    }
    Some((tgid, pid_tgid as u32))
}

/// What this thread's in-flight entry, if any, means for a call entering at `sp`.
enum Pending {
    /// No allocator call in progress on this thread.
    None,
    /// A call still running further up this stack: the new call is nested in it.
    Outer(*mut InFlight),
    /// An entry whose return never ran (a missed return probe, or a thread that died inside
    /// the allocator): its allocation is lost.
    Stale,
}

#[inline(always)]
fn pending_call(tid: u32, sp: u64) -> Pending {
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

/// Walks the frame-pointer chain from the allocator's entry. `[rsp]` holds the direct caller's
/// return address (the allocator has not pushed its frame yet); `rbp` still points at the
/// caller's frame, whose saved return address leads to the caller's caller, and so on.
#[inline(always)]
fn capture_stack(tgid: u32, sp: u64, fp: u64) -> StackKey {
    let mut key = StackKey {
        tgid,
        _pad: 0,
        stack_id: 0,
        ret_addr: 0,
    };
    // SAFETY: reads of user memory through the fault-tolerant helper.
    let ret: u64 = match unsafe { bpf_probe_read_user(sp as *const u64) } {
        Ok(r) => r,
        Err(_) => {
            count(Counter::StackFailures);
            return key;
        }
    };
    key.ret_addr = ret;
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackFailures);
        return key;
    };
    // SAFETY: per-CPU scratch slot, exclusive for the duration of this program.
    let buf = unsafe { &mut *buf };
    buf.frames[0] = ret;
    buf.flags = 0;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ ret;
    hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    let mut len: usize = 1;
    let mut fp = fp;
    while len < MAX_STACK_DEPTH {
        if fp == 0 || fp & 7 != 0 {
            break;
        }
        // SAFETY: as above.
        let frame: [u64; 2] = match unsafe { bpf_probe_read_user(fp as *const [u64; 2]) } {
            Ok(f) => f,
            Err(_) => break,
        };
        let (next_fp, ret) = (frame[0], frame[1]);
        if ret == 0 {
            break;
        }
        buf.frames[len] = ret;
        len += 1;
        hash ^= ret;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        if next_fp <= fp {
            break;
        }
        fp = next_fp;
    }
    if len == MAX_STACK_DEPTH {
        buf.flags = STACK_TRUNCATED;
    }
    buf.len = len as u32;
    let hash = if hash == 0 { 1 } else { hash };
    match STACKS.insert(hash, buf, BPF_NOEXIST as u64) {
        Ok(()) => key.stack_id = hash,
        // -EEXIST: this stack is already stored.
        Err(e) if e == -17 => key.stack_id = hash,
        Err(_) => count(Counter::StackFailures),
    }
    key
}

#[inline(always)]
fn alloc_enter(ctx: &ProbeContext, kind: AllocKind, size: u64, ptr_arg: u64) -> u32 {
    let Some((tgid, tid)) = current_target() else {
        return 0;
    };
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
    let stack = capture_stack(tgid, sp, regs.rbp);
    let call = InFlight {
        size,
        ptr_arg,
        sp,
        stack,
        kind: kind as u32,
        depth: 0,
    };
    if INFLIGHT.insert(tid, &call, 0).is_err() {
        count(Counter::InflightFull);
    }
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// `a * b`, or `u64::MAX` on overflow (`checked_mul` needs a 128-bit multiply BPF lacks).
#[inline(always)]
fn mul_or_max(a: u64, b: u64) -> u64 {
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
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Pvalloc, arg(&ctx, 0), 0)
}

/// Forgets a live allocation and credits its stack. Returns false when the address is unknown.
#[inline(always)]
fn release(tgid: u32, addr: u64) -> bool {
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr,
    };
    // SAFETY: value copied out before the delete.
    let Some(info) = (unsafe { ALLOCS.get(&key) }).copied() else {
        count(Counter::UnknownFrees);
        return false;
    };
    let _ = ALLOCS.remove(&key);
    count(Counter::Frees);
    if let Some(t) = STACK_TOTALS.get_ptr_mut(&info.stack) {
        // SAFETY: per-CPU value of a successful lookup.
        unsafe {
            (*t).free_bytes += info.size;
            (*t).free_count += 1;
        }
    } else {
        let t = StackTotals {
            free_bytes: info.size,
            free_count: 1,
            ..StackTotals::default()
        };
        if STACK_TOTALS.insert(&info.stack, &t, 0).is_err() {
            count(Counter::StackTotalsFull);
        }
    }
    true
}

#[inline(always)]
fn record(tgid: u32, tid: u32, addr: u64, size: u64, call: &InFlight) {
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr,
    };
    let info = AllocInfo {
        size,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        stack: call.stack,
        kind: call.kind,
        tid,
    };
    if ALLOCS.insert(&key, &info, 0).is_err() {
        count(Counter::AllocMapFull);
        return;
    }
    count(Counter::Allocs);
    if let Some(t) = STACK_TOTALS.get_ptr_mut(&call.stack) {
        // SAFETY: per-CPU value of a successful lookup.
        unsafe {
            (*t).alloc_bytes += size;
            (*t).alloc_count += 1;
        }
    } else {
        let t = StackTotals {
            alloc_bytes: size,
            alloc_count: 1,
            ..StackTotals::default()
        };
        if STACK_TOTALS.insert(&call.stack, &t, 0).is_err() {
            count(Counter::StackTotalsFull);
        }
    }
}

const PAGE_SIZE: u64 = 4096;

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    let Some((tgid, tid)) = current_target() else {
        return 0;
    };
    let Some(p) = INFLIGHT.get_ptr_mut(tid) else {
        count(Counter::OrphanReturns);
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
    match kind {
        AllocKind::Realloc | AllocKind::Reallocarray => {
            let old = call.ptr_arg;
            if ret != 0 {
                if old != 0 {
                    release(tgid, old);
                }
                record(tgid, tid, ret, call.size, &call);
            } else if call.size == 0 && old != 0 && kind == AllocKind::Realloc {
                // realloc(p, 0) frees p and returns NULL.
                release(tgid, old);
            } else {
                // Failure: the old block is untouched.
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

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let Some((tgid, tid)) = current_target() else {
        return 0;
    };
    let addr = arg(&ctx, 0);
    if addr == 0 {
        return 0;
    }
    // SAFETY: the context's registers are valid for the duration of the program.
    let sp = unsafe { (*ctx.regs).rsp };
    if let Pending::Outer(_) = pending_call(tid, sp) {
        // A free made by realloc itself: its return probe accounts for the old block.
        count(Counter::Nested);
        return 0;
    }
    release(tgid, addr);
    0
}

/// `_exit`: in `-- CMD` mode, hold the target at the door so its maps can be read.
#[uprobe]
pub fn exit_enter(_ctx: ProbeContext) -> u32 {
    if knob(&STOP_AT_EXIT) == 0 || current_target().is_none() {
        return 0;
    }
    count(Counter::ExitStops);
    // SAFETY: plain helper call; the signal goes to the current process.
    unsafe { bpf_send_signal(SIGSTOP) };
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
