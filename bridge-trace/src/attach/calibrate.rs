//! What a probe hit costs the traced thread on this machine beyond the program's own run time
//! (which the kernel's statistics count): measured at start by `watch`, once per kind of place
//! ([`Hit`]), on three functions of bridge-trace's own whose first instruction the kernel emulates
//! (`push %rbp`), single-steps (`mov %rdi,%rax`), and turns into a call (the 5-byte nop of a
//! USDT site, which x86 kernels since 6.18 rewrite after its first hit). The budget then charges each program's
//! runs at the cost of its places as they are in the target ([`Tracer::hit_classes`]), so a
//! service whose allocator is probed on single-stepped instructions is charged for them.
use std::{num::NonZeroU32, path::PathBuf, time::Instant};

use bridge_trace_common::names::program;

use super::{attach_places, detaching, drop_in_parallel, Hit, ProbeAt, Tracer};
use crate::{
    error::{Error, Result},
    model::maps::read_maps,
};

/// What a run of a uprobe program costs the traced thread beyond the program, in nanoseconds,
/// per kind of place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeCosts {
    pub emulated_ns: f64,
    pub stepped_ns: f64,
    /// A return probe's trap on the way back.
    pub return_ns: f64,
    /// A probe on a 5-byte nop (a USDT site).
    pub nop_ns: f64,
}

impl Default for ProbeCosts {
    /// When nothing could be measured: the figures measured on this kind of machine
    /// (about 0.5 µs a trap, 14 µs with a single step).
    fn default() -> Self {
        ProbeCosts {
            emulated_ns: 500.0,
            stepped_ns: 14_000.0,
            return_ns: 500.0,
            nop_ns: 500.0,
        }
    }
}

impl ProbeCosts {
    pub fn per_run(&self, hit: Hit) -> f64 {
        match hit {
            Hit::Nop => self.nop_ns,
            Hit::Return => self.return_ns,
            Hit::Emulated => self.emulated_ns,
            Hit::SingleStepped => self.stepped_ns,
        }
    }
}

/// Begins with an instruction the kernel emulates.
#[unsafe(naked)]
extern "C" fn emulated_entry() {
    core::arch::naked_asm!("push rbp", "pop rbp", "ret")
}

/// Begins with a 5-byte nop, as a USDT site is.
#[unsafe(naked)]
extern "C" fn nop_entry() {
    core::arch::naked_asm!(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", "ret")
}

/// Begins with an instruction the kernel single-steps.
#[unsafe(naked)]
extern "C" fn stepped_entry() {
    core::arch::naked_asm!("mov rax, rdi", "ret")
}

/// Nanoseconds per call of `f`, over `calls` calls.
fn per_call(f: extern "C" fn(), calls: u32) -> f64 {
    let f = std::hint::black_box(f);
    let started = Instant::now();
    for _ in 0..calls {
        f();
    }
    started.elapsed().as_nanos() as f64 / f64::from(calls)
}

/// The object mapping `f` in this process, and `f`'s offset in its file.
fn place_of(f: extern "C" fn()) -> Result<(PathBuf, u64)> {
    let addr = f as usize as u64;
    let maps = read_maps(std::process::id())?;
    let m = maps
        .iter()
        .find(|m| m.executable && (m.start..m.end).contains(&addr))
        .ok_or_else(|| Error::Ebpf("calibration: own code is not mapped from a file".into()))?;
    // The file we run, whatever its path has become since.
    Ok((PathBuf::from("/proc/self/exe"), addr - m.start + m.offset))
}

impl Tracer {
    /// Measures what a probe hit costs here, per kind of place: times calls of a function with
    /// and without empty programs attached at its first instruction (an entry program; an
    /// entry and a return program), then detaches them. Nothing of bridge-trace is recorded.
    pub fn calibrate(&mut self) -> Result<ProbeCosts> {
        const CALLS: u32 = 20_000;
        // A single step costs some 30 times more: fewer calls take as long.
        const STEPPED_CALLS: u32 = 2_000;
        let me =
            NonZeroU32::new(std::process::id()).ok_or_else(|| Error::Usage("no pid".into()))?;
        let mut with =
            |f: extern "C" fn(), stepped: bool, calls: u32, programs: &[&'static str]| {
                let (object, at) = place_of(f)?;
                let place = ProbeAt {
                    at,
                    cookie: 0,
                    stepped,
                };
                let mut links = Vec::new();
                for &program in programs {
                    let placed = attach_places(
                        &mut self.ebpf,
                        self.multi.as_mut(),
                        program,
                        &object,
                        &[place],
                        me,
                    );
                    match placed {
                        Ok(placed) => links.extend(placed),
                        Err(e) => {
                            drop_in_parallel(detaching(&mut self.ebpf, links));
                            return Err(e);
                        }
                    }
                }
                let ns = per_call(f, calls);
                drop_in_parallel(detaching(&mut self.ebpf, links));
                Ok::<f64, Error>(ns)
            };
        let base = per_call(emulated_entry, CALLS);
        let emulated = with(emulated_entry, false, CALLS, &[program::FLOOR_ENTER])?;
        let both = with(
            emulated_entry,
            false,
            CALLS,
            &[program::FLOOR_RETURN_EMPTY, program::FLOOR_ENTER],
        )?;
        let stepped_base = per_call(stepped_entry, CALLS);
        let stepped = with(stepped_entry, true, STEPPED_CALLS, &[program::FLOOR_ENTER])?;
        let nop_base = per_call(nop_entry, CALLS);
        let nop = with(nop_entry, false, CALLS, &[program::FLOOR_ENTER])?;
        let costs = ProbeCosts {
            emulated_ns: (emulated - base).max(0.0),
            stepped_ns: (stepped - stepped_base).max(0.0),
            return_ns: (both - emulated).max(0.0),
            nop_ns: (nop - nop_base).max(0.0),
        };
        tracing::info!(?costs, base_ns = base, "probe costs measured");
        Ok(costs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::placement::steps;

    /// The calibration's two functions begin with the kinds of instruction they stand for, as
    /// the placement tells them apart.
    #[test]
    fn calibration_functions_are_what_they_stand_for() {
        let code = |f: extern "C" fn()| {
            // SAFETY: reads the first bytes of a function's code, mapped readable.
            unsafe { std::slice::from_raw_parts(f as usize as *const u8, 4) }.to_vec()
        };
        assert!(!steps(&code(emulated_entry), 0));
        assert!(steps(&code(stepped_entry), 0));
        // SAFETY: as above, the nop and the ret after it.
        let nop = unsafe { std::slice::from_raw_parts(nop_entry as *const () as *const u8, 6) };
        assert_eq!(nop[..5], crate::target::usdt::SITE_NOP);
        assert_eq!(nop[5], 0xc3, "ret");
        emulated_entry();
        stepped_entry();
        nop_entry();
    }
}
