//! Read-only knobs, set by the user half before load (`attach::Tracer::load`), and the one
//! way to read them.
use bridge_trace_common::UnwindMode;

/// 1: stop the target with SIGSTOP when it calls `_exit`, so that the user half (its parent, in
/// `-- CMD` mode) can read its memory maps before they disappear, then SIGCONT it.
#[no_mangle]
pub(crate) static STOP_AT_EXIT: u32 = 0;

/// How stacks are walked: an [`UnwindMode`].
#[no_mangle]
pub(crate) static UNWIND_MODE: u32 = UnwindMode::Auto as u32;

/// 1: stop the target with SIGSTOP where it has mapped new objects and not run their code yet
/// (`start_enter`), so that the user half can load their unwind tables first.
#[no_mangle]
pub(crate) static STOP_AT_START: u32 = 0;

/// The process those holds apply to: the launched one, whose parent (the user half) sees it
/// stop. A followed child stopped there would wait for a SIGCONT nobody sends.
#[no_mangle]
pub(crate) static HOLD_TGID: u32 = 0;

/// Where `task_newtask`'s `pid` and `clone_flags` fields are in its record (from the event's
/// format in tracefs, read by the user half), for `--follow-children`.
#[no_mangle]
pub(crate) static NEWTASK_PID_AT: u32 = 8;
#[no_mangle]
pub(crate) static NEWTASK_FLAGS_AT: u32 = 32;
