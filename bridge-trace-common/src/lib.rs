//! Plain `#[repr(C)]` types shared by the kernel half (`bridge-trace-ebpf`) and the user half
//! (`bridge-trace`): map keys and values, map sizes and counter indices. Nothing else lives here.
//!
//! Every type is plain old data with fixed-width fields and explicit padding, and its size is
//! pinned by a `const` assertion so that the two halves can never disagree about a layout.
#![no_std]

/// Deepest user stack recorded for one allocation, the direct caller included.
pub const MAX_STACK_DEPTH: usize = 64;
/// Default capacity of the live-allocation map (`--max-allocs`).
pub const DEFAULT_MAX_ALLOCS: u32 = 1 << 19;
/// Capacity of the stack map and of the per-stack totals.
pub const MAX_STACKS: u32 = 1 << 15;
/// Capacity of the per-thread "call in progress" map.
pub const MAX_INFLIGHT: u32 = 1 << 14;
/// A nested allocator call (e.g. glibc's `memalign` calling `malloc`) runs on the same thread
/// with a stack pointer at most this far below the outer call's; anything else is a stale entry
/// left by a thread that died inside the allocator.
pub const NESTING_WINDOW: u64 = 64 * 1024;

/// The allocator entry points bridge-trace understands, with their argument conventions.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    PosixMemalign = 4,
    AlignedAlloc = 5,
    Memalign = 6,
    Valloc = 7,
    Pvalloc = 8,
}

impl AllocKind {
    pub const ALL: [AllocKind; 9] = [
        AllocKind::Malloc,
        AllocKind::Calloc,
        AllocKind::Realloc,
        AllocKind::Reallocarray,
        AllocKind::PosixMemalign,
        AllocKind::AlignedAlloc,
        AllocKind::Memalign,
        AllocKind::Valloc,
        AllocKind::Pvalloc,
    ];

    pub fn from_u32(v: u32) -> Option<AllocKind> {
        Self::ALL.get(v as usize).copied()
    }

    /// The C function name of this entry point.
    pub const fn name(self) -> &'static str {
        match self {
            AllocKind::Malloc => "malloc",
            AllocKind::Calloc => "calloc",
            AllocKind::Realloc => "realloc",
            AllocKind::Reallocarray => "reallocarray",
            AllocKind::PosixMemalign => "posix_memalign",
            AllocKind::AlignedAlloc => "aligned_alloc",
            AllocKind::Memalign => "memalign",
            AllocKind::Valloc => "valloc",
            AllocKind::Pvalloc => "pvalloc",
        }
    }
}

/// Counters kept per CPU by the kernel half and summed by the user half.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Successful allocations recorded.
    Allocs = 0,
    /// Frees (and realloc moves) of a recorded allocation.
    Frees = 1,
    /// Allocator calls that returned NULL (or an error for posix_memalign).
    FailedAllocs = 2,
    /// Allocations that could not be recorded because the live-allocation map was full.
    AllocMapFull = 3,
    /// Allocations whose user stack could not be stored (kept, with their direct caller).
    StackFailures = 4,
    /// Frees of addresses not in the map: allocated before attaching, or dropped when full.
    UnknownFrees = 5,
    /// Allocator calls made from inside another traced allocator call (counted once, outside).
    Nested = 6,
    /// Calls whose entry could not be remembered until their return (in-flight map full).
    InflightFull = 7,
    /// Per-stack totals that could not be updated (per-stack map full).
    StackTotalsFull = 8,
    /// Return probes that fired without a matching entry (attached mid-call).
    OrphanReturns = 9,
    /// posix_memalign out-pointers that could not be read back.
    ReadFaults = 10,
    /// Times the target was held at `_exit` (launched targets only) so its maps could be read.
    ExitStops = 11,
    /// In-flight entries found stale (their return probe never ran, e.g. the kernel skipped it
    /// while another BPF program ran on the CPU): that allocation was not recorded.
    LostReturns = 12,
}

pub const COUNTER_COUNT: u32 = 13;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Allocs,
        Counter::Frees,
        Counter::FailedAllocs,
        Counter::AllocMapFull,
        Counter::StackFailures,
        Counter::UnknownFrees,
        Counter::Nested,
        Counter::InflightFull,
        Counter::StackTotalsFull,
        Counter::OrphanReturns,
        Counter::ReadFaults,
        Counter::ExitStops,
        Counter::LostReturns,
    ];
}

/// Key of the live-allocation map: one process, one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// Identity of an allocation's call stack within one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tgid: u32,
    pub _pad: u32,
    /// Hash of the frames, the key of the stack map; 0 when the stack could not be stored.
    pub stack_id: u64,
    /// The direct caller's return address, read at `[rsp]` on entry (the allocator has not built
    /// its frame yet, so a frame-pointer walk alone would skip it). Kept here as well so that an
    /// allocation whose stack could not be stored is still attributed to its caller.
    pub ret_addr: u64,
}

/// Value of the stack map: return addresses, the direct caller first, root last.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackFrames {
    pub len: u32,
    /// `STACK_TRUNCATED` when the walk stopped at `MAX_STACK_DEPTH` frames.
    pub flags: u32,
    pub frames: [u64; MAX_STACK_DEPTH],
}

pub const STACK_TRUNCATED: u32 = 1;

/// Value of the live-allocation map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocInfo {
    pub size: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the allocation's return.
    pub ts_ns: u64,
    pub stack: StackKey,
    pub kind: u32,
    pub tid: u32,
}

/// An allocator call between its entry and its return, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub size: u64,
    /// realloc/reallocarray: the old pointer; posix_memalign: the out-pointer's address.
    pub ptr_arg: u64,
    /// Stack pointer at entry, to tell nested calls from stale entries.
    pub sp: u64,
    pub stack: StackKey,
    pub kind: u32,
    /// Allocator calls nested inside this one that have not returned yet.
    pub depth: u32,
}

/// Running totals for one stack, per CPU (summed in user space; no atomics on bpfel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackTotals {
    pub alloc_bytes: u64,
    pub alloc_count: u64,
    pub free_bytes: u64,
    pub free_count: u64,
}

const _: () = assert!(core::mem::size_of::<AllocKey>() == 16);
const _: () = assert!(core::mem::size_of::<StackKey>() == 24);
const _: () = assert!(core::mem::size_of::<AllocInfo>() == 48);
const _: () = assert!(core::mem::size_of::<InFlight>() == 56);
const _: () = assert!(core::mem::size_of::<StackTotals>() == 32);
const _: () = assert!(core::mem::size_of::<StackFrames>() == 8 + 8 * MAX_STACK_DEPTH);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]` plain old data with explicit padding and no
    // invalid bit patterns.
    unsafe impl aya::Pod for AllocKey {}
    unsafe impl aya::Pod for StackKey {}
    unsafe impl aya::Pod for AllocInfo {}
    unsafe impl aya::Pod for InFlight {}
    unsafe impl aya::Pod for StackTotals {}
    unsafe impl aya::Pod for StackFrames {}
}
