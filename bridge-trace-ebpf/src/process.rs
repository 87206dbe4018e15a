//! Process events: an exec releases the old image; a forked child is held at its first page
//! fault until its probes are attached (`--follow-children`); a launched target is held where
//! it has mapped new objects (`start_enter`) and at `_exit`.
use aya_ebpf::{helpers::*, macros::*, programs::*};
use bridge_trace_common::*;

use crate::{helpers::*, knobs::*, maps::*};

/// A target execs another program: its address space is replaced, every live allocation of the
/// old image released at once, with no free to see.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(_ctx: RawTracePointContext) -> i32 {
    let (task, _) = current_task();
    // SAFETY: the value is copied out.
    if let Some(parent) = unsafe { VFORKED.get(&task) }.copied() {
        // A child started to run a program: it is followed from its new image's first fault.
        let _ = VFORKED.remove(&task);
        let _ = FORKED.insert(task, parent, 0);
        return 0;
    }
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

pub(crate) const CLONE_VM: u64 = 0x100;
pub(crate) const CLONE_THREAD: u64 = 0x10000;

/// A target creates a task: a forked process is remembered in [`FORKED`]; not its threads; a
/// child sharing its memory (vfork, posix_spawn), which runs only to exec, in [`VFORKED`],
/// to be followed into the program it execs.
#[tracepoint(category = "task", name = "task_newtask")]
pub fn new_task(ctx: TracePointContext) -> u32 {
    let Some((parent, _)) = current_target() else {
        return 0;
    };
    // SAFETY: reads of the tracepoint's record at offsets its format gives.
    let flags: u64 = unsafe { ctx.read_at(knob(&NEWTASK_FLAGS_AT) as usize) }.unwrap_or(0);
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    // SAFETY: as above.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(knob(&NEWTASK_PID_AT) as usize) }) else {
        return 0;
    };
    if flags & CLONE_VM != 0 {
        let _ = VFORKED.insert(child as u32, parent, 0);
        return 0;
    }
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
    let _ = CHILD_OF.insert(tgid, parent, 0);
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
