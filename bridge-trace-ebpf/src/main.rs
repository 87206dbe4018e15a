//! The kernel half of bridge-trace: uprobes and uretprobes on the allocator's entry points that
//! keep, in kernel maps, every live allocation of the target processes (address → size, stack,
//! time) and running totals per call stack; and probes on what makes a heap grow (libc's
//! brk/mmap/munmap/mremap, and first-touch page faults through their raw tracepoint),
//! attributing that growth to user stacks (`watch --tier growth`).
//!
//! Every entry probe is a one-line wrapper over [`alloc_enter`]; one return probe,
//! [`alloc_return`], serves them all; [`free_enter`] handles `free`. The user half reads the maps;
//! only this file writes them, except the few listed as user-written below.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_send_signal,
    },
    macros::{map, raw_tracepoint, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
    EbpfContext as _,
};
use bridge_trace_common::{
    cfa_rule, config, rbp_rule, AllocInfo, AllocKey, AllocKind, Counter, GrowthTotals, InFlight,
    MmapRegion, PendingSyscall, ProcUnwind, Releasing, StackFrames, StackKey, StackTotals,
    UnwindMode, UnwindPage, UnwindRow, UnwindRule, COUNTER_COUNT, DEFAULT_MAX_ALLOCS,
    EXP_QUANTILES, EXP_QUANTILE_SHIFT, MAX_INFLIGHT, MAX_REGIONS, MAX_STACKS, MAX_STACK_DEPTH,
    MAX_TARGETS, MAX_UNWIND_MAPPINGS, MAX_UNWIND_PAGES, MAX_UNWIND_PROCS, MAX_UNWIND_ROWS,
    MAX_UNWIND_RULES, NESTED_FREE_NS, NESTING_WINDOW, NOT_SAMPLED, STACK_TRUNCATED,
    UNWIND_PAGE_SHIFT,
};

// ---- Read-only knobs, set by the user half before load. ----

/// 1: stop the target with SIGSTOP when it calls `_exit`, so that the user half (its parent, in
/// `-- CMD` mode) can read its memory maps before they disappear, then SIGCONT it.
#[no_mangle]
static STOP_AT_EXIT: u32 = 0;

/// How stacks are walked: an [`UnwindMode`].
#[no_mangle]
static UNWIND_MODE: u32 = UnwindMode::Auto as u32;

/// 1: stop the target with SIGSTOP where it has mapped new objects and not run their code yet
/// (`start_enter`), so that the user half can load their unwind tables first.
#[no_mangle]
static STOP_AT_START: u32 = 0;

/// The process those holds apply to: the launched one, whose parent (the user half) sees it
/// stop. A followed child stopped there would wait for a SIGCONT nobody sends.
#[no_mangle]
static HOLD_TGID: u32 = 0;

/// Where `task_newtask`'s `pid` and `clone_flags` fields are in its record (from the event's
/// format in tracefs, read by the user half), for `--follow-children`.
#[no_mangle]
static NEWTASK_PID_AT: u32 = 8;
#[no_mangle]
static NEWTASK_FLAGS_AT: u32 = 32;

// ---- Maps. TARGETS, CONFIG and EXP_TABLE are written by the user half's `attach` module, the
// unwind maps by its `unwind` module, and only read here; every other map is written here only,
// and the user half only reads (and sizes) it, except that `attach` removes a held child from
// HELD_CHILDREN when it lets it go. ----

/// The processes being traced (tgid → 1; user-written). Uprobes are also attached for these
/// pids only; the check keeps a stray event from another process out of the maps, and is what
/// the system-wide tracepoints filter on.
#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Settings changed while tracing, indexed by [`config`] (user-written).
#[map]
static CONFIG: Array<u64> = Array::with_max_entries(config::COUNT, 0);

/// Quantiles of the unit exponential distribution, fixed point (user-written once): the
/// sampler's intervals are drawn from them.
#[map]
static EXP_TABLE: Array<u32> = Array::with_max_entries(EXP_QUANTILES, 0);

/// Per CPU: bytes still to be allocated before the next sampled allocation (0: not drawn yet).
#[map]
static SAMPLER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Heap growth per stack, per CPU: written by the growth tracepoints.
#[map]
static GROWTH: PerCpuHashMap<StackKey, GrowthTotals> =
    PerCpuHashMap::with_max_entries(MAX_STACKS, 0);

/// Anonymous regions the targets mapped while traced: (tgid, start) → length, stack.
#[map]
static REGIONS: HashMap<AllocKey, MmapRegion> = HashMap::with_max_entries(MAX_REGIONS, 0);

/// Heap-growth calls in progress, per thread id: written at entry, consumed at return.
#[map]
static SYSCALLS: HashMap<u32, PendingSyscall> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Each target's program break as last seen (tgid → address).
#[map]
static BREAKS: HashMap<u32, u64> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Rows of every loaded object's unwind table, each table sorted by address (user-written,
/// memory-mapped by the user half).
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(MAX_UNWIND_ROWS, BPF_F_MMAPABLE);

/// Page index of every loaded table: for each 4 KiB page of code, the rows to search
/// (user-written, memory-mapped by the user half).
#[map]
static UNWIND_PAGES: Array<UnwindPage> = Array::with_max_entries(MAX_UNWIND_PAGES, BPF_F_MMAPABLE);

/// Per CPU: rows found lately (see [`RowCache`]).
#[map]
static ROW_CACHE: PerCpuArray<RowCache> = PerCpuArray::with_max_entries(1, 0);

/// Every distinct unwind rule of the loaded tables, referred to by rows (user-written,
/// memory-mapped by the user half).
#[map]
static UNWIND_RULES: Array<UnwindRule> = Array::with_max_entries(MAX_UNWIND_RULES, BPF_F_MMAPABLE);

/// Per process: its executable mappings and where their tables are in [`UNWIND_ROWS`]
/// (user-written).
#[map]
static UNWIND_PROCS: HashMap<u32, ProcUnwind> = HashMap::with_max_entries(MAX_UNWIND_PROCS, 0);

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

/// The stack walk in progress (too large for the 512-byte BPF stack).
#[map]
static SCRATCH: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

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

/// (tgid, tid) of the current task, for the allocator probes' hot path. Those probes need no
/// [`TARGETS`] lookup: their links are attached per process (`UProbeScope::OneProcess`), and
/// the kernel runs a per-process uprobe only for tasks sharing that process's memory (its
/// threads; a forked child has its own), and user space detaches them before it forgets a
/// target.
#[inline(always)]
fn current_task() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// Returns (tgid, tid) when the current task belongs to a target.
#[inline(always)]
fn current_target() -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: the value is not kept.
    unsafe { TARGETS.get(&tgid) }?;
    Some((tgid, pid_tgid as u32))
}

/// The mean sampling interval in bytes; 0 when every allocation is recorded.
#[inline(always)]
fn sample_interval() -> u64 {
    CONFIG.get(config::SAMPLE_INTERVAL).copied().unwrap_or(0)
}

/// Whether an allocation of `size` bytes is sampled: a Poisson process over allocated bytes with
/// mean `interval` (as jemalloc and tcmalloc sample), so an allocation is sampled with
/// probability 1 - exp(-size / interval), which the user half inverts into its weight.
#[inline(always)]
fn sampled(size: u64, interval: u64) -> bool {
    let Some(left) = SAMPLER.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot, exclusive while the program runs.
    let left = unsafe { &mut *left };
    let first = *left == 0;
    if !first && *left > size {
        *left -= size;
        return false;
    }
    // SAFETY: plain helper call.
    let i = unsafe { bpf_get_prandom_u32() } & (EXP_QUANTILES - 1);
    let q = EXP_TABLE.get(i).copied().unwrap_or(1 << EXP_QUANTILE_SHIFT) as u64;
    // Memoryless: the distance from here to the next sample point is a fresh draw.
    let next = ((q * interval) >> EXP_QUANTILE_SHIFT).max(1);
    if first && next > size {
        *left = next - size;
        return false;
    }
    *left = next;
    true
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

/// A stack walk in progress, in the per-CPU [`SCRATCH`] slot: the registers of the frame being
/// unwound and the frames so far. It lives in map memory, not on the BPF stack, so that the
/// verifier checks the `bpf_loop` callback once rather than once per distinct frame count.
#[repr(C)]
pub struct Walk {
    pc: u64,
    sp: u64,
    bp: u64,
    hash: u64,
    /// 1 once the walk has ended by itself (not at the depth limit).
    done: u32,
    /// The mapping the last frame was found in (a hint for the next).
    mapping: u32,
    frames: StackFrames,
}

/// What the `bpf_loop` callback needs besides the walk itself.
#[repr(C)]
struct WalkCtx {
    /// The target's unwind mappings, or null (frame pointers only).
    procs: *const ProcUnwind,
    /// This CPU's row cache, or null.
    cache: *mut RowCache,
    mode: u32,
    tgid: u32,
    /// 1: the walk starts at a function's first instruction (an allocator's entry), whose
    /// frame is not built yet; 0: anywhere in a function (a syscall, a page fault).
    at_entry: u32,
}

const ROW_CACHE_SLOTS: usize = 256;

/// A row found for one return address of one process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedRow {
    pc: u64,
    tgid: u32,
    generation: u32,
    row: UnwindRule,
}

/// Rows found lately, by return address: a hot allocation site's stack is walked again and
/// again, and a hit here costs one cache line instead of a search through the tables.
#[repr(C)]
pub struct RowCache {
    slots: [CachedRow; ROW_CACHE_SLOTS],
}

/// `x`, with LLVM no longer able to see its range, so that the explicit bound a caller applies
/// next stays in the program for the verifier to see.
#[inline(always)]
fn opaque(x: u32) -> u32 {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&x) }
}

/// The index of the mapping of `procs` that contains `pc`, trying `hint` (the previous
/// frame's) first: consecutive frames are mostly in the same object.
#[inline(always)]
fn find_mapping(procs: &ProcUnwind, pc: u64, hint: u32) -> Option<usize> {
    let count = opaque(procs.count);
    if count == 0 || count as usize > MAX_UNWIND_MAPPINGS {
        return None;
    }
    let h = &procs.mappings[hint as usize & (MAX_UNWIND_MAPPINGS - 1)];
    if h.start <= pc && pc < h.end {
        return Some(hint as usize & (MAX_UNWIND_MAPPINGS - 1));
    }
    // The last mapping starting at or below pc: a binary search with a bounded trip count.
    let (mut base, mut n) = (0u32, count);
    for _ in 0..9 {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        let mid = opaque(base + half) as usize & (MAX_UNWIND_MAPPINGS - 1);
        if procs.mappings[mid].start <= pc {
            base += half;
        }
        n -= half;
    }
    Some(opaque(base) as usize & (MAX_UNWIND_MAPPINGS - 1))
}

/// The unwind rule for `pc` from the target's tables, if any; `hint` is the mapping the
/// previous frame was in, updated to this one's.
#[inline(always)]
fn find_row(procs: &ProcUnwind, pc: u64, hint: &mut u32) -> Option<UnwindRule> {
    let i = find_mapping(procs, pc, *hint)?;
    *hint = i as u32;
    let m = &procs.mappings[i];
    if pc < m.start || pc >= m.end || pc < m.bias {
        return None;
    }
    let rel = pc - m.bias;
    if rel > u32::MAX as u64 {
        return None;
    }
    let rel = rel as u32;
    // The page's rows: from the row covering its first byte to the one covering the next
    // page's, inclusive.
    let page = rel >> UNWIND_PAGE_SHIFT;
    if page < m.first_page || page - m.first_page >= m.page_count {
        return None;
    }
    let rows = UNWIND_PAGES.get(m.page_start + (page - m.first_page))?;
    let (lo, hi) = (rows.first, rows.last);
    if hi < lo {
        return None;
    }
    let (mut base, mut n) = (lo, hi - lo + 1);
    for _ in 0..16 {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        let r = UNWIND_ROWS.get(base + half)?;
        if r.pc <= rel {
            base += half;
        }
        n -= half;
    }
    let r = UNWIND_ROWS.get(base)?;
    if r.pc > rel {
        return None;
    }
    UNWIND_RULES.get(r.rule).copied()
}

#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: a fault-tolerant read of the target's memory.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Where the walk goes from the current frame: (return address, caller's sp, caller's rbp), or
/// None when the stack ends here.
#[inline(always)]
fn step_frame(w: &mut Walk, c: &WalkCtx, first: bool, at_entry: bool) -> Option<(u64, u64, u64)> {
    let row = if c.mode != UnwindMode::Fp as u32 && !c.procs.is_null() {
        // A return address points after its call: look up the call itself.
        let pc = if first { w.pc } else { w.pc - 1 };
        // SAFETY: map value pointers checked for null when the walk started.
        let procs = unsafe { &*c.procs };
        let slot = (pc ^ (pc >> 11)) as usize & (ROW_CACHE_SLOTS - 1);
        let cached = if c.cache.is_null() {
            None
        } else {
            // SAFETY: as above; this CPU's slot, exclusive while the program runs.
            let e = unsafe { &(*c.cache).slots[slot] };
            (e.pc == pc && e.tgid == c.tgid && e.generation == procs.generation).then_some(e.row)
        };
        match cached {
            Some(r) => Some(r),
            None => {
                let found = find_row(procs, pc, &mut w.mapping);
                if let (Some(r), false) = (found, c.cache.is_null()) {
                    // SAFETY: as above.
                    let e = unsafe { &mut (*c.cache).slots[slot] };
                    *e = CachedRow {
                        pc,
                        tgid: c.tgid,
                        generation: procs.generation,
                        row: r,
                    };
                }
                found
            }
        }
        .filter(|r| r.cfa_rule != cfa_rule::NONE)
    } else {
        None
    };
    let Some(row) = row else {
        if c.mode == UnwindMode::Fp as u32 {
            return fp_step(w, first && at_entry);
        }
        count(Counter::UnwindNoTable);
        // `--unwind dwarf`: no table, no frame; `auto`: frame pointers here.
        return if c.mode == UnwindMode::Dwarf as u32 {
            None
        } else {
            fp_step(w, first && at_entry)
        };
    };
    let cfa = match row.cfa_rule {
        cfa_rule::RSP => w.sp.wrapping_add(row.cfa_offset as i64 as u64),
        cfa_rule::RBP => w.bp.wrapping_add(row.cfa_offset as i64 as u64),
        cfa_rule::PLT => {
            w.sp + 8
                + if (w.pc & 15) as i32 >= row.cfa_offset {
                    8
                } else {
                    0
                }
        }
        cfa_rule::DEREF_RBP => {
            let Some(v) = read_user(w.bp.wrapping_add(row.cfa_offset as i64 as u64)) else {
                count(Counter::UnwindReadFault);
                return None;
            };
            v
        }
        cfa_rule::END => return None,
        _ => {
            count(Counter::UnwindBadRule);
            return None;
        }
    };
    if cfa <= w.sp {
        // The stack grows down: a caller's frame is always above. Anything else is garbage.
        return None;
    }
    if row.rbp_rule == rbp_rule::OFFSET && row.rbp_offset == -16 {
        // The usual prologue (push %rbp first): one read for the saved rbp and the return
        // address, which sit side by side.
        // SAFETY: a fault-tolerant read of the target's memory.
        let Ok(pair) = (unsafe { bpf_probe_read_user((cfa - 16) as *const [u64; 2]) }) else {
            count(Counter::UnwindReadFault);
            return None;
        };
        return Some((pair[1], cfa, pair[0]));
    }
    let Some(ret) = read_user(cfa.wrapping_sub(8)) else {
        count(Counter::UnwindReadFault);
        return None;
    };
    let bp = match row.rbp_rule {
        rbp_rule::OFFSET => match read_user(cfa.wrapping_add(row.rbp_offset as i64 as u64)) {
            Some(v) => v,
            None => {
                count(Counter::UnwindReadFault);
                return None;
            }
        },
        rbp_rule::UNDEFINED => 0,
        _ => w.bp,
    };
    Some((ret, cfa, bp))
}

/// One frame-pointer step. At the allocator's entry (`first`) the function has not pushed its
/// frame yet: `[rsp]` is the direct caller's return address and rbp is still the caller's.
#[inline(always)]
fn fp_step(w: &Walk, first: bool) -> Option<(u64, u64, u64)> {
    if first {
        let ret = read_user(w.sp)?;
        return Some((ret, w.sp + 8, w.bp));
    }
    let fp = w.bp;
    if fp == 0 || fp & 7 != 0 || fp < w.sp {
        return None;
    }
    // SAFETY: a fault-tolerant read of the target's memory.
    let frame: [u64; 2] = unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }.ok()?;
    Some((frame[1], fp + 16, frame[0]))
}

/// `bpf_loop` callback: unwinds one frame and appends its return address. Returns 1 to stop.
#[inline(never)]
extern "C" fn unwind_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the `WalkCtx` given to it in `capture_stack`.
    let c = unsafe { &*(ctx as *const WalkCtx) };
    let Some(w) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch slot, exclusive for the duration of this program.
    let w = unsafe { &mut *w };
    let len = w.frames.len as usize;
    if len >= MAX_STACK_DEPTH {
        return 1;
    }
    let Some((ret, sp, bp)) = step_frame(w, c, index == 0, c.at_entry != 0) else {
        w.done = 1;
        return 1;
    };
    if ret == 0 {
        w.done = 1;
        return 1;
    }
    w.frames.frames[len] = ret;
    w.frames.len += 1;
    w.hash = fnv_step(w.hash, ret);
    w.pc = ret;
    w.sp = sp;
    w.bp = bp;
    0
}

const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// One step of the FNV-1a-like hash of a stack's frames (the key of [`STACKS`]).
#[inline(always)]
fn fnv_step(hash: u64, frame: u64) -> u64 {
    (hash ^ frame).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Stores `frames` in [`STACKS`] under `hash` (once per distinct stack) and returns `key` with
/// its stack id; a stack that cannot be stored is counted and keeps only its direct caller.
#[inline(always)]
fn store_stack(frames: &StackFrames, hash: u64, mut key: StackKey) -> StackKey {
    let hash = if hash == 0 { 1 } else { hash };
    match STACKS.insert(hash, frames, BPF_NOEXIST as u64) {
        Ok(()) => key.stack_id = hash,
        // -EEXIST: this stack is already stored.
        Err(e) if e == -17 => key.stack_id = hash,
        Err(_) => count(Counter::StackFailures),
    }
    key
}

/// Walks the user stack from `pc`, `sp`, `bp`: with the target's unwind tables where they cover
/// the code, with frame pointers elsewhere (see [`UnwindMode`]). Stores the frames once per
/// distinct stack: at an allocator's entry (`at_entry`) the return addresses, the direct caller
/// first; elsewhere `pc` itself, then the return addresses.
#[inline(always)]
fn capture_stack(tgid: u32, pc: u64, sp: u64, bp: u64, at_entry: bool) -> StackKey {
    let mut key = StackKey {
        tgid,
        _pad: 0,
        stack_id: 0,
        ret_addr: 0,
    };
    // `--unwind fp` walks here too: measured on this kind of machine, the kernel's own
    // frame-pointer walk (`bpf_get_stack`) costs ~1.1 µs for 12 frames, and this loop ~20 %
    // less per malloc+free pair.
    let mode = knob(&UNWIND_MODE);
    let procs = if mode == UnwindMode::Fp as u32 {
        core::ptr::null()
    } else {
        // SAFETY: the pointer is only read while this program runs.
        match unsafe { UNWIND_PROCS.get(&tgid) } {
            Some(p) => p as *const ProcUnwind,
            None => core::ptr::null(),
        }
    };
    let Some(w) = SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackFailures);
        return key;
    };
    {
        // SAFETY: per-CPU scratch slot, exclusive for the duration of this program.
        let w = unsafe { &mut *w };
        w.pc = pc;
        w.sp = sp;
        w.bp = bp;
        w.hash = FNV_BASIS;
        w.done = 0;
        w.mapping = 0;
        w.frames.len = 0;
        w.frames.flags = 0;
        if !at_entry {
            w.frames.frames[0] = pc;
            w.frames.len = 1;
            w.hash = fnv_step(w.hash, pc);
        }
    }
    let cache = match ROW_CACHE.get_ptr_mut(0) {
        Some(c) if !procs.is_null() => c,
        _ => core::ptr::null_mut(),
    };
    let mut ctx = WalkCtx {
        procs,
        cache,
        mode,
        tgid,
        at_entry: u32::from(at_entry),
    };
    // SAFETY: the callback is a BPF subprogram; `ctx` outlives the call.
    unsafe {
        bpf_loop(
            MAX_STACK_DEPTH as u32,
            unwind_step as *mut c_void,
            &mut ctx as *mut WalkCtx as *mut c_void,
            0,
        )
    };
    // SAFETY: as above; the callback has returned.
    let w = unsafe { &mut *w };
    if w.frames.len == 0 {
        count(Counter::StackFailures);
        return key;
    }
    key.ret_addr = w.frames.frames[0];
    if w.done == 0 && w.frames.len as usize >= MAX_STACK_DEPTH {
        w.frames.flags = STACK_TRUNCATED;
        count(Counter::UnwindDepthLimit);
    }
    store_stack(&w.frames, w.hash, key)
}

#[inline(always)]
fn alloc_enter(ctx: &ProbeContext, kind: AllocKind, size: u64, ptr_arg: u64) -> u32 {
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
    if interval != 0 && !sampled(size, interval) {
        count(Counter::Unsampled);
        if matches!(kind, AllocKind::Realloc | AllocKind::Reallocarray) && ptr_arg != 0 {
            // The old block may be a sampled one: its return forgets it if it moved.
            let call = InFlight {
                size,
                ptr_arg,
                sp,
                kind: kind as u32,
                interval: NOT_SAMPLED,
                ..InFlight::default()
            };
            if INFLIGHT.insert(tid, &call, 0).is_err() {
                count(Counter::InflightFull);
            }
        }
        return 0;
    }
    let stack = capture_stack(tgid, regs.rip, sp, regs.rbp, true);
    let call = InFlight {
        size,
        ptr_arg,
        sp,
        stack,
        kind: kind as u32,
        depth: 0,
        interval,
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
pub fn xallocx_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Xallocx, arg(&ctx, 1), arg(&ctx, 0))
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    alloc_enter(&ctx, AllocKind::Pvalloc, arg(&ctx, 0), 0)
}

/// Whether release functions may nest ([`config::NESTED_FREES`]).
#[inline(always)]
fn nested_frees() -> bool {
    CONFIG.get(config::NESTED_FREES).copied().unwrap_or(0) != 0
}

/// Forgets a live allocation and credits its stack. Returns false when the address is unknown,
/// counted when `count_unknown` and not sampling (where most addresses are unknown by design).
#[inline(always)]
fn release(tgid: u32, addr: u64, count_unknown: bool) -> bool {
    let key = AllocKey::new(tgid, addr);
    // SAFETY: value copied out before the delete.
    let Some(info) = (unsafe { ALLOCS.get(&key) }).copied() else {
        if count_unknown && sample_interval() == 0 {
            count(Counter::UnknownFrees);
        }
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
        if call.ptr_arg != 0 && ret != call.ptr_arg && (ret != 0 || call.size == 0) {
            release(tgid, call.ptr_arg, false);
        }
        return 0;
    }
    match kind {
        AllocKind::Realloc | AllocKind::Reallocarray => {
            let old = call.ptr_arg;
            if ret != 0 {
                if old != 0 {
                    release(tgid, old, false);
                }
                record(tgid, tid, ret, call.size, &call);
            } else if call.size == 0 && old != 0 && kind == AllocKind::Realloc {
                // realloc(p, 0) frees p and returns NULL.
                release(tgid, old, false);
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
fn resize(tgid: u32, addr: u64, size: u64) {
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

/// free: the map delete and the per-stack update, nothing else. A free the allocator makes
/// itself (glibc's `realloc(p, 0)` calls `free(p)`) releases the block here, and the realloc's
/// return then finds it gone ([`release`] with `count_unknown` false).
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let addr = arg(&ctx, 0);
    if addr == 0 {
        return 0;
    }
    let (tgid, tid) = current_task();
    if !nested_frees() {
        release(tgid, addr, true);
        return 0;
    }
    // SAFETY: the context's registers are valid for the duration of the program.
    let sp = unsafe { (*ctx.regs).rsp };
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
    release(tgid, addr, true);
    let last = Releasing {
        addr,
        sp,
        ts_ns: now,
    };
    let _ = RELEASING.insert(&tid, &last, 0);
    0
}

// ---- Heap growth (`watch --tier growth`): libc's brk/mmap/munmap/mremap, and first-touch
// page faults. ----

const SYS_MMAP: u64 = 9;
const SYS_MUNMAP: u64 = 11;
const SYS_BRK: u64 = 12;
const SYS_MREMAP: u64 = 25;
const MAP_ANONYMOUS: u64 = 0x20;
/// x86 page-fault error code: the page was present (a protection fault, not a first touch).
const PF_PROT: u64 = 1;

/// The user registers the page-fault tracepoint passes as a `struct pt_regs *`.
#[inline(always)]
fn user_regs(ptr: u64) -> Option<aya_ebpf::bindings::pt_regs> {
    // SAFETY: a fault-tolerant read of kernel memory.
    unsafe { bpf_probe_read_kernel(ptr as *const aya_ebpf::bindings::pt_regs) }.ok()
}

/// Adds growth to a stack's totals.
#[inline(always)]
fn grow(stack: &StackKey, mapped: u64, unmapped: u64, faulted: u64) {
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
fn growth_enter(ctx: &ProbeContext, nr: u64) -> u32 {
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
        stack: capture_stack(tgid, regs.rip, regs.rsp, regs.rbp, true),
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

const MAP_FAILED: u64 = u64::MAX;

/// Return of a heap-growth wrapper: turns the call into growth (or shrinkage) of its stack.
#[uretprobe]
pub fn growth_return(ctx: RetProbeContext) -> u32 {
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
fn map_region(tgid: u32, addr: u64, len: u64, stack: &StackKey) {
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
fn unmap(tgid: u32, addr: u64, len: u64) {
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
    let stack = capture_stack(tgid, regs.rip, regs.rsp, regs.rbp, false);
    grow(&stack, 0, 0, PAGE_SIZE);
    0
}

// ---- The floor (`cargo xtask bench`): what any uprobe-based allocation tracer pays at least
// on this machine. Not used by record or watch. ----

/// Per CPU: where the floor's return probe puts the user stack it captures.
#[map]
static FLOOR_STACK: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);

/// The floor's allocation entry probe: nothing.
#[uprobe]
pub fn floor_enter(_ctx: ProbeContext) -> u32 {
    0
}

/// The floor's return probe: the kernel's own user stack capture (frame pointers), nothing else.
#[uretprobe]
pub fn floor_return(ctx: RetProbeContext) -> u32 {
    if let Some(s) = FLOOR_STACK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, exclusive while the program runs; the helper writes at most
        // the size given.
        unsafe {
            aya_ebpf::helpers::bpf_get_stack(
                ctx.as_ptr(),
                (*s).frames.as_mut_ptr() as *mut c_void,
                (MAX_STACK_DEPTH * 8) as u32,
                aya_ebpf::bindings::BPF_F_USER_STACK as u64,
            )
        };
    }
    0
}

/// A return probe that does nothing (the floor's parts, measured alone).
#[uretprobe]
pub fn floor_return_empty(_ctx: RetProbeContext) -> u32 {
    0
}

/// The floor's free probe: nothing.
#[uprobe]
pub fn floor_free(_ctx: ProbeContext) -> u32 {
    0
}

/// Per thread, its last release, while nested releases are possible ([`free_enter`]).
#[map]
static RELEASING: HashMap<u32, Releasing> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// The last exec of each target (monotonic ns): whatever it allocated before went with its old
/// image, and user space drops those allocations ([`process_exec`]).
#[map]
static EXECS: HashMap<u32, u64> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// A target execs another program: its address space is replaced, every live allocation of the
/// old image released at once, with no free to see.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(_ctx: RawTracePointContext) -> i32 {
    let Some((tgid, _)) = current_target() else {
        return 0;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = EXECS.insert(tgid, now, 0);
    0
}

// ---- Children (`--follow-children`): a target's forked child is held at its first page
// fault — before its first allocation, since returning from fork writes to its stack, which
// fork made copy-on-write — until its own probes are attached. ----

/// Children a target forked that have not faulted yet: child pid → parent tgid.
#[map]
static FORKED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Children held (SIGSTOP) at their first fault: child pid → parent tgid. The user half
/// attaches their probes, sends SIGCONT and removes the entry.
#[map]
static HELD_CHILDREN: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

const CLONE_VM: u64 = 0x100;
const CLONE_THREAD: u64 = 0x10000;

/// A target creates a task: a forked process is remembered in [`FORKED`]; not its threads,
/// and not a child sharing its memory (vfork, posix_spawn), which runs only to exec.
#[tracepoint(category = "task", name = "task_newtask")]
pub fn new_task(ctx: TracePointContext) -> u32 {
    let Some((parent, _)) = current_target() else {
        return 0;
    };
    // SAFETY: reads of the tracepoint's record at offsets its format gives.
    let flags: u64 = unsafe { ctx.read_at(knob(&NEWTASK_FLAGS_AT) as usize) }.unwrap_or(0);
    if flags & (CLONE_THREAD | CLONE_VM) != 0 {
        return 0;
    }
    // SAFETY: as above.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(knob(&NEWTASK_PID_AT) as usize) }) else {
        return 0;
    };
    let _ = FORKED.insert(child as u32, parent, 0);
    0
}

/// Every user page fault, system-wide (`--follow-children` only): a remembered child's first
/// one holds it.
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn child_fault(_ctx: RawTracePointContext) -> i32 {
    let (tgid, _) = current_task();
    // SAFETY: the value is copied out.
    let Some(parent) = (unsafe { FORKED.get(&tgid) }).copied() else {
        return 0;
    };
    let _ = FORKED.remove(&tgid);
    if HELD_CHILDREN.insert(tgid, parent, 0).is_err() {
        return 0;
    }
    count(Counter::ChildStops);
    // SAFETY: plain helper call; the signal goes to the current process.
    unsafe { bpf_send_signal(SIGSTOP) };
    0
}

/// Where new objects are mapped and none of their code has run (glibc's `__libc_early_init`,
/// the loader's `_dl_debug_state` at every dlopen, a static program's entry point): in
/// `-- CMD` mode, hold the target so that their unwind tables are loaded first.
#[uprobe]
pub fn start_enter(_ctx: ProbeContext) -> u32 {
    if knob(&STOP_AT_START) == 0 || current_task().0 != knob(&HOLD_TGID) {
        return 0;
    }
    count(Counter::StartStops);
    // SAFETY: plain helper call; the signal goes to the current process.
    unsafe { bpf_send_signal(SIGSTOP) };
    0
}

/// `_exit`: in `-- CMD` mode, hold the target at the door so its maps can be read.
#[uprobe]
pub fn exit_enter(_ctx: ProbeContext) -> u32 {
    if knob(&STOP_AT_EXIT) == 0 || current_task().0 != knob(&HOLD_TGID) {
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
