//! Every probe bridge-trace attaches, declared in one place: the kernel program that reads each
//! kind of allocator entry point ([`entry_program`]) and the attach order of an allocator's
//! probes ([`allocator_probes`]), the growth tier's probes ([`GROWTH_PROBES`]), the
//! system-wide tracepoints, and the benchmark's floor ([`floor_probes`]).
use bridge_trace_common::names::program;
use clap::ValueEnum;

use super::placement::Reads;
use crate::target::{Allocator, EntryKind};

/// One probe: an eBPF program attached to an allocator symbol.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub program: &'static str,
    pub symbol: &'static str,
    /// Without it nothing sensible can be traced (malloc and free).
    pub required: bool,
    pub place: Place,
}

/// Where in its function a probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// An entry program that reads this much of the call: on the first instruction the kernel
    /// emulates rather than single-steps ([`placement`]).
    Emulated(Reads),
    /// A return probe: where its function's entry probe goes.
    WithEntry,
    /// The function's first instruction, whatever it costs (the bench's floor rows only).
    FirstInstruction,
}

/// A return probe.
const fn ret(program: &'static str, symbol: &'static str, required: bool) -> Probe {
    Probe {
        program,
        symbol,
        required,
        place: Place::WithEntry,
    }
}

/// An entry probe whose program reads `args` arguments.
const fn entry(program: &'static str, symbol: &'static str, required: bool, args: usize) -> Probe {
    Probe {
        program,
        symbol,
        required,
        place: Place::Emulated(Reads { args }),
    }
}

/// The kernel program that reads each kind of allocator entry point, and how many of its
/// arguments it reads. `alloc_return` (one program for every allocation function) records the
/// result.
pub fn entry_program(kind: EntryKind) -> (&'static str, usize) {
    match kind {
        EntryKind::Free => (program::FREE_ENTER, 1),
        EntryKind::Malloc => (program::MALLOC_ENTER, 1),
        EntryKind::Calloc => (program::CALLOC_ENTER, 2),
        EntryKind::Realloc => (program::REALLOC_ENTER, 2),
        EntryKind::Reallocarray => (program::REALLOCARRAY_ENTER, 3),
        EntryKind::PosixMemalign => (program::POSIX_MEMALIGN_ENTER, 3),
        EntryKind::AlignedAlloc => (program::ALIGNED_ALLOC_ENTER, 2),
        EntryKind::Memalign => (program::MEMALIGN_ENTER, 2),
        EntryKind::Valloc => (program::VALLOC_ENTER, 1),
        EntryKind::Pvalloc => (program::PVALLOC_ENTER, 1),
        EntryKind::Xallocx => (program::XALLOCX_ENTER, 2),
    }
}

/// One allocator probe: a program on a symbol of an allocator object, placed for what its
/// entry program reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocProbe {
    pub program: &'static str,
    pub symbol: String,
    pub reads: Reads,
}

/// Every probe for one allocator object, in attach order, from the table of entry points it
/// defines ([`target::ENTRY_POINTS`]). What releases memory comes first, then each
/// allocation function's return probe before its entry probe, so that no allocation is
/// recorded whose release or return could still be missed; `_exit` (the launched target's
/// hold) last.
pub fn allocator_probes(allocator: &Allocator) -> Vec<AllocProbe> {
    let mut probes = Vec::new();
    let releases = allocator.entries.iter().filter(|(_, k)| k.releases());
    let allocates = allocator.entries.iter().filter(|(_, k)| !k.releases());
    for (symbol, kind) in releases.chain(allocates) {
        let (program, args) = entry_program(*kind);
        let reads = Reads { args };
        if !kind.releases() {
            probes.push(AllocProbe {
                program: program::ALLOC_RETURN,
                symbol: symbol.clone(),
                reads,
            });
        }
        probes.push(AllocProbe {
            program,
            symbol: symbol.clone(),
            reads,
        });
    }
    if allocator.exit {
        probes.push(AllocProbe {
            program: program::EXIT_ENTER,
            symbol: "_exit".into(),
            reads: Reads { args: 0 },
        });
    }
    probes
}

/// The growth tier's probes on libc's heap-growth wrappers, per process: cheaper for the
/// machine than syscall tracepoints, which would put every syscall of every process on the
/// kernel's slow path. (Each return probe before its entry probe.)
pub const GROWTH_PROBES: &[Probe] = &[
    ret(program::GROWTH_RETURN, "munmap", false),
    entry(program::MUNMAP_ENTER, "munmap", false, 2),
    ret(program::GROWTH_RETURN, "mremap", false),
    entry(program::MREMAP_ENTER, "mremap", false, 3),
    ret(program::GROWTH_RETURN, "brk", false),
    entry(program::BRK_ENTER, "brk", false, 1),
    ret(program::GROWTH_RETURN, "mmap", false),
    entry(program::MMAP_ENTER, "mmap", false, 4),
];

// The floor of `cargo xtask bench` and of the overhead calibration: empty programs at the
// same places as the allocator probes, and the kernel's own user stack capture in a return
// probe.
pub(super) const FLOOR_ENTRY: Probe = entry(program::FLOOR_ENTER, "malloc", true, 1);

pub(super) const FLOOR_RETURN: Probe = ret(program::FLOOR_RETURN_EMPTY, "malloc", true);

pub(super) const FLOOR_STACK: Probe = ret(program::FLOOR_RETURN, "malloc", true);

pub(super) const FLOOR_FREE: Probe = entry(program::FLOOR_FREE, "free", true, 1);

pub(super) const FLOOR_FREE_AT_ENTRY: Probe = Probe {
    place: Place::FirstInstruction,
    ..FLOOR_FREE
};

/// The floor's probes, whole or in parts.
pub fn floor_probes(parts: FloorParts) -> &'static [Probe] {
    match parts {
        FloorParts::MallocEntry => &[FLOOR_ENTRY],
        FloorParts::MallocReturn => &[FLOOR_RETURN, FLOOR_ENTRY],
        FloorParts::MallocStack => &[FLOOR_STACK, FLOOR_ENTRY],
        FloorParts::FreeEntry => &[FLOOR_FREE_AT_ENTRY],
        FloorParts::All => &[FLOOR_FREE, FLOOR_STACK, FLOOR_ENTRY],
    }
}

/// The growth tier's raw tracepoint, system-wide (a user page fault anywhere runs it; it
/// returns at once outside the targets): first touches of new memory.
pub const GROWTH_TRACEPOINT: (&str, &str) = (program::PAGE_FAULT_USER, "page_fault_user");

/// Execs of the targets, system-wide (returns at once for other processes): an exec releases
/// every allocation of the old image, with no free to see.
pub const EXEC_TRACEPOINT: (&str, &str) = (program::PROCESS_EXEC, "sched_process_exec");

/// New tasks of the targets (`--follow-children`): a forked child is remembered.
pub const NEWTASK_TRACEPOINT: (&str, &str, &str) = (program::NEW_TASK, "task", "task_newtask");

/// A remembered child's first page fault holds it (`--follow-children`), system-wide.
pub const CHILD_FAULT_TRACEPOINT: (&str, &str) = (program::CHILD_FAULT, "page_fault_user");

/// What a probe of a static table ([`GROWTH_PROBES`], the floor's) is placed for: its own
/// reads, or for a return probe its entry probe's.
pub(super) fn static_reads(p: &Probe) -> Option<Reads> {
    match p.place {
        Place::Emulated(reads) => Some(reads),
        Place::WithEntry => GROWTH_PROBES
            .iter()
            .chain([FLOOR_ENTRY, FLOOR_FREE].iter())
            .find_map(|e| match e.place {
                Place::Emulated(reads) if e.symbol == p.symbol => Some(reads),
                _ => None,
            }),
        Place::FirstInstruction => None,
    }
}

/// The parts of the benchmark's floor, each measured alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FloorParts {
    /// An empty probe on malloc (where bridge-trace places it).
    MallocEntry,
    /// An empty probe and an empty return probe on malloc.
    MallocReturn,
    /// The same, the return probe capturing the user stack.
    MallocStack,
    /// An empty probe on free's first instruction (single-stepped by glibc's free).
    FreeEntry,
    /// The floor: malloc's entry, return and stack, and free where bridge-trace probes it.
    All,
}
