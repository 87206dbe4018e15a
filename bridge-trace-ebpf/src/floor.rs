//! The floor (`cargo xtask bench`): what any uprobe-based allocation tracer pays at least on
//! this machine. Not used by record or watch.
use core::ffi::c_void;

use aya_ebpf::{macros::*, programs::*, EbpfContext as _};
use bridge_trace_common::*;

use crate::maps::*;

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
