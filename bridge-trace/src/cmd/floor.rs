//! `bridge-trace floor --pid PID` (hidden): the benchmark's floor. Empty programs on the
//! process's malloc (entry and return, the return capturing the user stack with the kernel's
//! own helper) and free, at the places [`crate::attach::placement`] chooses, until the process exits or
//! Ctrl-C: what any uprobe-based allocation tracer pays at least, per malloc+free pair. Each
//! part can be measured alone (`--parts`), and free's probe put on its first instruction, to
//! show what each costs.
use std::time::Duration;

use crate::{
    attach::{FloorParts, Knobs, Tracer},
    error::Result,
    target,
    unwind::Unwind,
};

pub fn run(pid: u32, parts: FloorParts) -> Result<()> {
    let maps = target::inspect_pid(pid)?;
    let allocators = target::find_allocators(pid, &maps)?;
    let allocator = target::hold_allocator(&allocators);
    let mut tracer = Tracer::load(Knobs {
        tgid: pid,
        launched: false,
        max_allocs: 1,
        unwind: Unwind::Fp.mode(),
        follow_children: false,
    })?;
    tracer.attach_floor(pid, allocator, parts)?;
    eprintln!("bridge-trace: floor probes ({parts:?}) on pid {pid}");
    // Ctrl-C or SIGTERM end the process; the kernel detaches the probes with its descriptors.
    while target::alive(pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(tracer);
    Ok(())
}
