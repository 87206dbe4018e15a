//! The stack walker: unwinds the user stack from the target's unwind tables where they
//! cover the code and with frame pointers elsewhere, in a `bpf_loop`, and stores each distinct
//! stack once in `STACKS`.
use core::ffi::c_void;

use aya_ebpf::{bindings::*, helpers::*, maps::PerCpuHashMap};
use bridge_trace_common::*;

use crate::{helpers::*, knobs::*, maps::*};

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
pub(crate) struct WalkCtx {
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

pub(crate) const ROW_CACHE_SLOTS: usize = 256;

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
pub(crate) fn opaque(x: u32) -> u32 {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&x) }
}

/// The index of the mapping of `procs` that contains `pc`, trying `hint` (the previous
/// frame's) first: consecutive frames are mostly in the same object.
#[inline(always)]
pub(crate) fn find_mapping(procs: &ProcUnwind, pc: u64, hint: u32) -> Option<usize> {
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

/// Steps of the binary search through one page's rows: a page of code (2^UNWIND_PAGE_SHIFT
/// bytes) has at most one row per byte, plus the next page's first row.
const ROW_SEARCH_STEPS: u32 = 16;
const _: () = assert!(1u64 << ROW_SEARCH_STEPS >= (1u64 << UNWIND_PAGE_SHIFT) + 1);

/// The unwind rule for `pc` from the target's tables, if any; `hint` is the mapping the
/// previous frame was in, updated to this one's.
#[inline(always)]
pub(crate) fn find_row(procs: &ProcUnwind, pc: u64, hint: &mut u32) -> Option<UnwindRule> {
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
    for _ in 0..ROW_SEARCH_STEPS {
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
pub(crate) fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: a fault-tolerant read of the target's memory.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Where the walk goes from the current frame: (return address, caller's sp, caller's rbp), or
/// None when the stack ends here.
#[inline(always)]
pub(crate) fn step_frame(
    w: &mut Walk,
    c: &WalkCtx,
    first: bool,
    at_entry: bool,
) -> Option<(u64, u64, u64)> {
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
pub(crate) fn fp_step(w: &Walk, first: bool) -> Option<(u64, u64, u64)> {
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

pub(crate) const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// The 64-bit FNV prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// "File exists": a `BPF_NOEXIST` insert of a key already there.
const EEXIST: i32 = 17;

/// One step of the FNV-1a-like hash of a stack's frames (the key of [`STACKS`]).
#[inline(always)]
pub(crate) fn fnv_step(hash: u64, frame: u64) -> u64 {
    (hash ^ frame).wrapping_mul(FNV_PRIME)
}

/// Stores `frames` in [`STACKS`] under `hash` (once per distinct stack) and returns `key` with
/// its stack id; a stack that cannot be stored is counted and keeps only its direct caller.
#[inline(always)]
pub(crate) fn store_stack(frames: &StackFrames, hash: u64, mut key: StackKey) -> StackKey {
    let hash = if hash == 0 { 1 } else { hash };
    match STACKS.insert(hash, frames, BPF_NOEXIST as u64) {
        Ok(()) => key.stack_id = hash,
        // This stack is already stored.
        Err(e) if e == -EEXIST => key.stack_id = hash,
        Err(_) => count(Counter::StackFailures),
    }
    key
}

/// For [`capture_stack`]'s callers that name no totals map.
pub(crate) const NO_TOTALS: Option<&PerCpuHashMap<StackKey, ()>> = None;

/// Walks the user stack from `pc`, `sp`, `bp`: with the target's unwind tables where they cover
/// the code, with frame pointers elsewhere (see [`UnwindMode`]). Stores the frames once per
/// distinct stack: at an allocator's entry (`at_entry`) the return addresses, the direct caller
/// first; elsewhere `pc` itself, then the return addresses.
///
/// `totals`, where given, is the per-stack map the caller credits next: a stack with an entry
/// there was stored when that entry was made (neither map forgets a stack of a live process),
/// so its one lookup, which the caller's credit then finds in cache, saves the lookup in
/// [`STACKS`] and the insert (one cold bucket and element fewer at each sample of the usdt
/// tier). The allocator probes, whose programs the verifier walks much further (the
/// `reallocarray` entry is refused with either lookup more), go without.
#[inline(always)]
pub(crate) fn capture_stack<V>(
    totals: Option<&PerCpuHashMap<StackKey, V>>,
    tgid: u32,
    pc: u64,
    sp: u64,
    bp: u64,
    at_entry: bool,
) -> StackKey {
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
    let hash = if w.hash == 0 { 1 } else { w.hash };
    let known = StackKey {
        stack_id: hash,
        ..key
    };
    // Where known, or looked up first: an insert of a stack already there would still take an
    // element, copy the frames into it and give it back (a kilobyte of cold memory at each
    // sample).
    // SAFETY: the value is not read.
    if totals.is_some_and(|t| t.get_ptr(&known).is_some() || unsafe { STACKS.get(&hash) }.is_some())
    {
        key.stack_id = hash;
        return key;
    }
    store_stack(&w.frames, hash, key)
}
