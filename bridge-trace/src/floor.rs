//! `bridge-trace floor --pid PID` (hidden): the benchmark's floor. Empty programs on the
//! process's malloc (entry and return, the return capturing the user stack with the kernel's
//! own helper) and free, at the places [`crate::placement`] chooses, until the process exits or
//! Ctrl-C: what any uprobe-based allocation tracer pays at least, per malloc+free pair.
use std::time::Duration;

use crate::{
    attach::{Knobs, Tracer},
    cli::Unwind,
    error::Result,
    target,
};

pub fn run(pid: u32) -> Result<()> {
    let maps = target::inspect_pid(pid)?;
    let allocator = target::find_allocator(pid, &maps)?;
    let mut tracer = Tracer::load(Knobs {
        tgid: pid,
        launched: false,
        max_allocs: 1,
        unwind: Unwind::Fp.mode(),
    })?;
    tracer.attach_floor(pid, &allocator)?;
    eprintln!("bridge-trace: floor probes on pid {pid}");
    // Ctrl-C or SIGTERM end the process; the kernel detaches the probes with its descriptors.
    while target::alive(pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(tracer);
    Ok(())
}
