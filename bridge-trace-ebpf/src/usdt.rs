//! The OpenTelemetry `otel_memory` USDT contract: a process that samples its own heap reports
//! each sampled allocation (`alloc(ptr, size, weight)`) and the free of each sampled block
//! (`free(ptr)`). Both programs find their arguments where the site's SDT descriptors say
//! ([`USDT_SPECS`], by the probe's cookie), and keep the samples in the same live set and
//! per-stack totals as the allocator probes, weighted ([`WEIGHTED`]).
use aya_ebpf::{helpers::*, macros::*, programs::*, EbpfContext as _};
use bridge_trace_common::*;

use crate::{
    alloc::record,
    free::{credit_free, take},
    helpers::*,
    maps::*,
    stack::capture_stack,
};

/// The register in `slot` of a copy of the registers ([`pt_regs_slot`]): one load at a
/// bounded offset into the copy (in [`USDT_REGS`], off the 512-byte stack), where a match
/// over the slots would be a branch for the verifier to walk per slot and argument.
#[inline(always)]
fn register(regs: &Regs, slot: u64) -> Option<u64> {
    if slot >= PT_REGS_SLOTS as u64 {
        return None;
    }
    regs.get(slot as usize).copied()
}

/// Argument `n` of the probe site as its descriptor says, sign- or zero-extended from its
/// size; `None` when it cannot be read.
#[inline(always)]
fn usdt_arg(regs: &Regs, spec: &UsdtSpec, n: usize) -> Option<u64> {
    let a = spec.args.get(n)?;
    let raw = match a.kind {
        usdt_arg::CONST => a.value as u64,
        usdt_arg::REG => register(regs, a.reg as u64)?,
        usdt_arg::DEREF => {
            let at = register(regs, a.reg as u64)?.wrapping_add(a.value as u64);
            // SAFETY: fault-tolerant read of the target's memory.
            unsafe { bpf_probe_read_user(at as *const u64) }.ok()?
        }
        _ => return None,
    };
    let bits = (a.size.unsigned_abs() * 8) as u64;
    if bits == 0 || bits >= 64 {
        return Some(raw);
    }
    let shift = 64 - bits;
    Some(if a.size < 0 {
        (((raw << shift) as i64) >> shift) as u64
    } else {
        (raw << shift) >> shift
    })
}

/// The spec of the probe site that ran and a copy of its registers.
#[inline(always)]
fn site(ctx: &ProbeContext) -> Option<(&'static UsdtSpec, &'static Regs)> {
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let spec = USDT_SPECS.get(cookie as u32)?;
    let copy = USDT_REGS.get_ptr_mut(0)?;
    let regs = ctx.regs as *const u64;
    // SAFETY: the context's registers are valid for the duration of the program, and
    // `struct pt_regs` starts with these 8-byte slots (constant offsets, unrolled); the
    // per-CPU copy is this program's alone while it runs.
    unsafe {
        for i in 0..PT_REGS_SLOTS {
            (*copy)[i] = core::ptr::read_volatile(regs.add(i));
        }
        Some((spec, &*copy))
    }
}

#[uprobe]
pub fn usdt_alloc(ctx: ProbeContext) -> u32 {
    guarded(|| {
        let Some((spec, regs)) = site(&ctx) else {
            return 0;
        };
        let (Some(ptr), Some(size), Some(weight)) = (
            usdt_arg(&regs, spec, 0),
            usdt_arg(&regs, spec, 1),
            usdt_arg(&regs, spec, 2),
        ) else {
            count(Counter::ReadFaults);
            return 0;
        };
        if ptr == 0 {
            return 0;
        }
        count(Counter::UsdtAllocs);
        let (tgid, tid) = current_task();
        // SAFETY: the value is not kept.
        if unsafe { USDT_CAPPED.get(&tgid) }.is_some() {
            count(Counter::UsdtCapped);
            return 0;
        }
        // Mid-function: the walk starts at the site itself (user space drops the frames of an
        // interposing sampler).
        let slot = |s: u64| register(regs, s).unwrap_or(0);
        let stack = capture_stack(
            Some(&STACK_TOTALS),
            tgid,
            slot(pt_regs_slot::RIP),
            slot(pt_regs_slot::RSP),
            slot(pt_regs_slot::RBP),
            false,
        );
        let call = InFlight {
            size,
            stack,
            kind: AllocKind::Sampled as u32,
            interval: WEIGHTED | weight.min(WEIGHTED - 1),
            ..InFlight::default()
        };
        record(tgid, tid, ptr, size, &call);
        0
    })
}

#[uprobe]
pub fn usdt_free(ctx: ProbeContext) -> u32 {
    guarded(|| {
        let Some((spec, regs)) = site(&ctx) else {
            return 0;
        };
        let Some(ptr) = usdt_arg(&regs, spec, 0) else {
            count(Counter::ReadFaults);
            return 0;
        };
        let (tgid, _) = current_task();
        match take(tgid, ptr) {
            Some(info) => credit_free(&info),
            None => count(Counter::UsdtUnknownFrees),
        }
        0
    })
}
