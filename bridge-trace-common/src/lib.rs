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
    /// jemalloc's `xallocx(ptr, size, extra, flags)`: resizes in place, returns the real size.
    Xallocx = 9,
    /// A sample the process reported itself (`otel_memory:alloc`): its weight is the bytes it
    /// stands for ([`WEIGHTED`]).
    Sampled = 10,
}

impl AllocKind {
    pub const ALL: [AllocKind; 11] = [
        AllocKind::Malloc,
        AllocKind::Calloc,
        AllocKind::Realloc,
        AllocKind::Reallocarray,
        AllocKind::PosixMemalign,
        AllocKind::AlignedAlloc,
        AllocKind::Memalign,
        AllocKind::Valloc,
        AllocKind::Pvalloc,
        AllocKind::Xallocx,
        AllocKind::Sampled,
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
            AllocKind::Xallocx => "xallocx",
            AllocKind::Sampled => "otel_memory:alloc",
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
    /// Frames walked with the frame-pointer fallback because no unwind table covered the
    /// address (an object whose tables were not loaded yet, or that has none).
    UnwindNoTable = 13,
    /// Stack walks stopped by a CFA rule bridge-trace cannot evaluate.
    UnwindBadRule = 14,
    /// Stack walks stopped because a saved register or return address could not be read.
    UnwindReadFault = 15,
    /// Stack walks stopped at `MAX_STACK_DEPTH` frames (the stack is truncated).
    UnwindDepthLimit = 16,
    /// Times the target was held once its libraries were mapped, or at a dlopen (launched
    /// targets only), so that their unwind tables could be loaded before their code ran.
    StartStops = 17,
    /// Allocations the byte sampler let pass unrecorded (`watch --tier sampled`).
    Unsampled = 18,
    /// Heap growth events seen: brk, anonymous mmap/munmap/mremap, first-touch page faults.
    GrowthEvents = 19,
    /// munmap/mremap of an address bridge-trace did not see mapped (mapped before attaching,
    /// a part of a region, or dropped when the region map was full).
    UnmatchedUnmaps = 20,
    /// Growth that could not be recorded because the region or per-stack growth map was full.
    GrowthMapFull = 21,
    /// Children of a target held at their first page fault (`--follow-children`) until their
    /// probes were attached.
    ChildStops = 22,
    /// Releases seen again inside the release that made them (a C++ `operator delete` ending
    /// in `free`): counted once.
    NestedFrees = 23,
    /// Frees of addresses never handed out, made by the allocator's own code (glibc's
    /// per-thread cache giving its cached chunks back when a thread exits): not the program's.
    InternalFrees = 24,
    /// Frees, by a followed child, of blocks its parent allocated before the fork (the child's
    /// copy of them): the parent's own copies stay its.
    InheritedFrees = 25,
    /// Probe runs skipped because another of bridge-trace's programs was preempted mid-run on
    /// the same CPU (multi-uprobe links have no kernel recursion guard; the per-CPU scratch
    /// state must not be shared).
    BusyCpu = 26,
    /// Sampled allocations a process reported through the `otel_memory` contract.
    UsdtAllocs = 27,
    /// Frees of reported samples bridge-trace had not seen allocated (reported before it
    /// attached, or dropped when the live map was full).
    UsdtUnknownFrees = 28,
    /// Samples a process reported while it held as many as its cap (`USDT_CAPPED`): not kept.
    UsdtCapped = 29,
}

pub const COUNTER_COUNT: u32 = 30;

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
        Counter::UnwindNoTable,
        Counter::UnwindBadRule,
        Counter::UnwindReadFault,
        Counter::UnwindDepthLimit,
        Counter::StartStops,
        Counter::Unsampled,
        Counter::GrowthEvents,
        Counter::UnmatchedUnmaps,
        Counter::GrowthMapFull,
        Counter::ChildStops,
        Counter::NestedFrees,
        Counter::InternalFrees,
        Counter::InheritedFrees,
        Counter::BusyCpu,
        Counter::UsdtAllocs,
        Counter::UsdtUnknownFrees,
        Counter::UsdtCapped,
    ];
}

/// The executable ranges of a target's allocator objects ([`names::map::ALLOCATOR_TEXT`]): a
/// free called from inside them, of an address never handed out, is the allocator's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextRanges {
    /// (start, end) pairs; unused ones are (0, 0).
    pub ranges: [[u64; 2]; MAX_TEXT_RANGES],
}

/// Executable mappings of allocator objects kept per target.
pub const MAX_TEXT_RANGES: usize = 4;

/// Key of the live-allocation map: one process, one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

impl AllocKey {
    pub const fn new(tgid: u32, addr: u64) -> AllocKey {
        AllocKey {
            tgid,
            _pad: 0,
            addr,
        }
    }
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
    /// 0: every allocation was recorded (its weight is its size); [`WEIGHTED`] | bytes for a
    /// sample, with the bytes it stands for: the weight the process reported
    /// (`otel_memory:alloc`), or the kernel sampler's (`sampled`). A plain interval (no flag)
    /// is the mean sampling interval of a sample whose weight is 1 / its probability.
    pub interval: u64,
}

/// [`AllocInfo::interval`]'s flag for a sample that carries its weight.
pub const WEIGHTED: u64 = 1 << 63;

/// The last release a thread made, while nested releases are possible (`config::NESTED_FREES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Releasing {
    pub addr: u64,
    pub sp: u64,
    pub ts_ns: u64,
}

/// How soon after a release a release of the same block by the same thread, deeper on its
/// stack and with no allocation by that thread in between, is the same release seen again (a
/// delete's tail jump to free takes nanoseconds; the margin is for a preempted thread).
pub const NESTED_FREE_NS: u64 = 1_000_000;

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
    /// As [`AllocInfo::interval`]; [`NOT_SAMPLED`] for a realloc the sampler skipped, whose
    /// return only forgets the old block if it moved.
    pub interval: u64,
    /// realloc/reallocarray: the old block, taken out of the live set at entry (when
    /// `holds_old` is 1). Forgetting it at the return instead would race with another thread
    /// that the allocator hands the freed address to before the return runs: the return would
    /// forget that thread's new block.
    pub old: AllocInfo,
    pub holds_old: u64,
}

/// [`InFlight::interval`] of a call the sampler skipped.
pub const NOT_SAMPLED: u64 = u64::MAX;

/// Indices of the `CONFIG` array: settings the user half changes while tracing.
pub mod config {
    /// Mean bytes between sampled allocations (a Poisson process over allocated bytes);
    /// 0: record every allocation.
    pub const SAMPLE_INTERVAL: u32 = 0;
    /// 1 once an allocator whose release functions may call one another is traced (C++
    /// `operator delete` tail-jumping to `free`, `mi_free_size` calling `mi_free`): the inner
    /// release of the same block is then recognised and not counted as an unknown free.
    pub const NESTED_FREES: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Largest sampling interval (1 TiB): keeps the kernel's fixed-point product in range.
pub const MAX_SAMPLE_INTERVAL: u64 = 1 << 40;

/// Where an entry program finds each argument it reads, as its probe's attach cookie: a
/// probe placed past the function's entry, after the function copied an argument to another
/// register and reused the first (`mov %rdi,%rsi; mov %fs:(%rax),%rdi`), reads it from the
/// copy. [`ARG_COOKIE_BITS`] bits per argument, in order: 0 for the ABI's register, otherwise
/// 1 + the register's slot in the kernel's `struct pt_regs` ([`pt_regs_slot`]).
pub const ARG_COOKIE_BITS: u32 = 5;

/// The general registers' 8-byte slots in x86-64's `struct pt_regs`.
pub mod pt_regs_slot {
    pub const R15: u64 = 0;
    pub const R14: u64 = 1;
    pub const R13: u64 = 2;
    pub const R12: u64 = 3;
    pub const RBP: u64 = 4;
    pub const RBX: u64 = 5;
    pub const R11: u64 = 6;
    pub const R10: u64 = 7;
    pub const R9: u64 = 8;
    pub const R8: u64 = 9;
    pub const RAX: u64 = 10;
    pub const RCX: u64 = 11;
    pub const RDX: u64 = 12;
    pub const RSI: u64 = 13;
    pub const RDI: u64 = 14;
    pub const RIP: u64 = 16;
    pub const RSP: u64 = 19;
}

/// 8-byte slots of x86-64's `struct pt_regs`, `r15` to `ss`.
pub const PT_REGS_SLOTS: usize = 21;
/// A copy of a probe's registers, by [`pt_regs_slot`].
pub type Regs = [u64; PT_REGS_SLOTS];

/// Probe sites of the `otel_memory` contract a spec can describe (`USDT_SPECS` slots).
pub const MAX_USDT_SPECS: u32 = 1024;
/// Arguments of one USDT probe bridge-trace reads (`otel_memory:alloc` has three).
pub const MAX_USDT_ARGS: usize = 3;

/// How a USDT argument is found, from its SDT descriptor (`8@%rdi`, `-4@-20(%rbp)`, `$42`).
pub mod usdt_arg {
    /// Not given.
    pub const NONE: u32 = 0;
    /// A constant: `value`.
    pub const CONST: u32 = 1;
    /// A register: its `pt_regs` slot.
    pub const REG: u32 = 2;
    /// Memory at a register plus `value`.
    pub const DEREF: u32 = 3;
}

/// One USDT argument: where it is ([`usdt_arg`]) and its size in bytes, negative when signed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtArg {
    pub kind: u32,
    pub reg: u32,
    pub value: i64,
    pub size: i32,
    pub _pad: u32,
}

/// Where one probe site's arguments are (the value of `USDT_SPECS`, indexed by the cookie of
/// the site's probe).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtSpec {
    pub args: [UsdtArg; MAX_USDT_ARGS],
}
/// Entries of the table of exponential quantiles the sampler draws its intervals from.
pub const EXP_QUANTILES: u32 = 4096;
/// Fixed-point shift of those quantiles: entry i is -ln((i + 0.5) / N) << 16.
pub const EXP_QUANTILE_SHIFT: u32 = 16;

/// Heap growth attributed to one stack, per CPU (`watch --tier growth`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrowthTotals {
    /// Bytes the stack added to the heap: brk growth and anonymous mmap/mremap growth.
    pub mapped: u64,
    /// Bytes given back: brk shrink, munmap, mremap shrink of regions this stack mapped.
    pub unmapped: u64,
    /// Bytes of pages touched for the first time (page faults on absent pages).
    pub faulted: u64,
    pub events: u64,
}

/// An anonymous region mapped by the target, by its start address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmapRegion {
    pub len: u64,
    pub stack: StackKey,
    /// CLOCK_MONOTONIC nanoseconds when it was mapped.
    pub ts_ns: u64,
}

/// A heap-growth call (brk, mmap, munmap, mremap) between its entry and its return, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSyscall {
    pub nr: u64,
    pub args: [u64; 4],
    pub stack: StackKey,
}

/// Capacity of the map of anonymous regions (per traced process set).
pub const MAX_REGIONS: u32 = 1 << 16;
/// Processes traced at once by one tracer (`watch --exe`).
pub const MAX_TARGETS: u32 = 1024;

/// Running totals for one stack, per CPU (summed in user space; no atomics on bpfel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackTotals {
    pub alloc_bytes: u64,
    pub alloc_count: u64,
    pub free_bytes: u64,
    pub free_count: u64,
    /// The bytes the recorded allocations stand for: their sizes when every allocation is
    /// recorded, else the sum of their samples' weights ([`WEIGHTED`]): an unbiased estimate
    /// of the bytes this stack allocated (pprof's `alloc_space`).
    pub est_bytes: u64,
    /// The allocations they stand for, in thousandths: each weight over its size (pprof's
    /// `alloc_objects`).
    pub est_objects_milli: u64,
    /// What the freed ones stood for, as `est_bytes` and `est_objects_milli` count it: the
    /// difference is the estimate of what the stack holds now.
    pub est_free_bytes: u64,
    pub est_free_objects_milli: u64,
    /// The freed allocations by how long they lived, [`LIFETIME_BOUNDS_NS`] apart.
    pub lifetimes: [u64; LIFETIME_BUCKETS],
}

/// Buckets of [`StackTotals::lifetimes`]: under 1 ms, 1-10 ms, ... 100-1000 s, and longer.
pub const LIFETIME_BUCKETS: usize = 8;
/// The upper bounds of the lifetime buckets but the last, in nanoseconds (decades from 1 ms).
pub const LIFETIME_BOUNDS_NS: [u64; LIFETIME_BUCKETS - 1] = [
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
    100_000_000_000,
    1_000_000_000_000,
];
/// A block freed within this many lifetime buckets of its allocation (10 ms) is temporary.
pub const TEMPORARY_BUCKETS: usize = 2;

/// How the kernel half walks user stacks (`--unwind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnwindMode {
    /// Frame pointers only.
    Fp = 0,
    /// Unwind tables where loaded, frame pointers elsewhere.
    Auto = 1,
    /// Unwind tables only: a frame without a table ends the stack.
    Dwarf = 2,
}

/// Capacity of the unwind-row array shared by every object's table (32 MiB of 8-byte rows: the
/// tables of rustc's two largest libraries, libLLVM and librustc_driver, take 2.6 M).
pub const MAX_UNWIND_ROWS: u32 = 1 << 22;
/// Capacity of the rule array: the distinct rules of every loaded object (a few thousand).
pub const MAX_UNWIND_RULES: u32 = 1 << 16;
/// Capacity of the page index: one entry per 4 KiB page of code with a table.
pub const MAX_UNWIND_PAGES: u32 = 1 << 20;
/// log2 of the page size of the page index.
pub const UNWIND_PAGE_SHIFT: u32 = 12;
/// Executable mappings with unwind tables per process.
pub const MAX_UNWIND_MAPPINGS: usize = 256;
/// Processes with unwind tables at once.
pub const MAX_UNWIND_PROCS: u32 = 1024;

/// How to find the canonical frame address (CFA: the caller's stack pointer before the call).
pub mod cfa_rule {
    /// No unwind information covers this address (a gap between functions).
    pub const NONE: u8 = 0;
    /// CFA = rsp + offset.
    pub const RSP: u8 = 1;
    /// CFA = rbp + offset.
    pub const RBP: u8 = 2;
    /// A PLT stub: CFA = rsp + 8, plus 8 once the stub has pushed its argument (rip & 15 >=
    /// offset), the expression every x86-64 linker writes for `.plt`.
    pub const PLT: u8 = 3;
    /// The return address is undefined: the outermost frame (`_start`, a thread's start).
    pub const END: u8 = 4;
    /// CFA = *(rbp + offset): a function that realigned its stack (`DW_OP_breg6; DW_OP_deref`).
    pub const DEREF_RBP: u8 = 5;
    /// A rule bridge-trace cannot evaluate in the kernel.
    pub const UNSUPPORTED: u8 = 6;
}

/// Where the caller's rbp is.
pub mod rbp_rule {
    /// Unchanged (the function has not touched it yet).
    pub const SAME: u8 = 0;
    /// Saved at CFA + offset.
    pub const OFFSET: u8 = 1;
    /// Lost: a later frame-pointer step cannot use it.
    pub const UNDEFINED: u8 = 2;
}

/// How to unwind one frame: where the CFA is and where the caller's rbp was saved. The return
/// address is always at CFA - 8. Rules are shared: a table's rows refer to them by index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRule {
    pub cfa_rule: u8,
    pub rbp_rule: u8,
    pub _pad: u16,
    pub cfa_offset: i32,
    pub rbp_offset: i32,
    pub _pad2: u32,
}

/// Rule 0 of the rule array: no unwind information (a gap between functions).
pub const NO_UNWIND_RULE: u32 = 0;

/// One row of a loaded unwind table: rule `rule` applies from `pc` up to the next row's `pc`,
/// `pc` relative to the object's own virtual addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    pub rule: u32,
}

/// One entry of the page index: the rows to search for an address in one 4 KiB page of code,
/// `[first, last]`: from the row covering the page's first byte to the one covering the next
/// page's. (8 bytes: BPF array elements are 8-byte aligned, memory-mapped ones included.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindPage {
    pub first: u32,
    pub last: u32,
}

/// One executable mapping of a process: runtime addresses `[start, end)` are object addresses
/// plus `bias`. Its table is indexed by page: object page `first_page + i` has entry
/// `page_start + i` of the page index, so that a lookup searches a few rows, not the whole
/// table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    pub page_start: u32,
    pub first_page: u32,
    /// Entries in the page index (pages covered).
    pub page_count: u32,
    pub _pad: u32,
}

/// Every mapping with unwind information of one process, sorted by `start`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcUnwind {
    pub count: u32,
    /// Changes whenever the mappings do, so that rows cached for the old ones are not used.
    pub generation: u32,
    pub mappings: [UnwindMapping; MAX_UNWIND_MAPPINGS],
}

const _: () = assert!(core::mem::size_of::<UnwindRow>() == 8);
const _: () = assert!(core::mem::size_of::<UnwindRule>() == 16);
const _: () = assert!(core::mem::size_of::<UnwindPage>() == 8);
const _: () = assert!(core::mem::size_of::<UnwindMapping>() == 40);
const _: () = assert!(core::mem::size_of::<ProcUnwind>() == 8 + 40 * MAX_UNWIND_MAPPINGS);
const _: () = assert!(core::mem::size_of::<AllocKey>() == 16);
const _: () = assert!(core::mem::size_of::<StackKey>() == 24);
const _: () = assert!(core::mem::size_of::<AllocInfo>() == 56);
const _: () = assert!(core::mem::size_of::<InFlight>() == 128);
const _: () = assert!(core::mem::size_of::<GrowthTotals>() == 32);
const _: () = assert!(core::mem::size_of::<MmapRegion>() == 40);
const _: () = assert!(core::mem::size_of::<PendingSyscall>() == 64);
const _: () = assert!(core::mem::size_of::<StackTotals>() == 64 + 8 * LIFETIME_BUCKETS);
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
    unsafe impl aya::Pod for TextRanges {}
    unsafe impl aya::Pod for StackFrames {}
    unsafe impl aya::Pod for UnwindRow {}
    unsafe impl aya::Pod for UnwindRule {}
    unsafe impl aya::Pod for UnwindMapping {}
    unsafe impl aya::Pod for UnwindPage {}
    unsafe impl aya::Pod for ProcUnwind {}
    unsafe impl aya::Pod for GrowthTotals {}
    unsafe impl aya::Pod for MmapRegion {}
    unsafe impl aya::Pod for PendingSyscall {}
    unsafe impl aya::Pod for UsdtSpec {}
}

/// The names the user half finds the kernel half's maps, globals and programs by. The kernel
/// half's `#[map]` statics and program functions carry these names (a macro attribute cannot
/// take a constant); `bridge-trace`'s unit tests open the built object and check that every
/// one of them is in it.
pub mod names {
    /// Maps (see `bridge-trace-ebpf/src/maps.rs` for who writes, reads and purges each).
    pub mod map {
        pub const TARGETS: &str = "TARGETS";
        pub const CONFIG: &str = "CONFIG";
        pub const EXP_TABLE: &str = "EXP_TABLE";
        pub const ALLOCS: &str = "ALLOCS";
        pub const INFLIGHT: &str = "INFLIGHT";
        pub const STACKS: &str = "STACKS";
        pub const STACK_TOTALS: &str = "STACK_TOTALS";
        pub const COUNTERS: &str = "COUNTERS";
        pub const GROWTH: &str = "GROWTH";
        pub const REGIONS: &str = "REGIONS";
        pub const BREAKS: &str = "BREAKS";
        pub const EXECS: &str = "EXECS";
        pub const HELD_CHILDREN: &str = "HELD_CHILDREN";
        pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
        pub const UNWIND_PAGES: &str = "UNWIND_PAGES";
        pub const UNWIND_RULES: &str = "UNWIND_RULES";
        pub const UNWIND_PROCS: &str = "UNWIND_PROCS";
        pub const ALLOCATOR_TEXT: &str = "ALLOCATOR_TEXT";
        pub const CHILD_OF: &str = "CHILD_OF";
        pub const USDT_SPECS: &str = "USDT_SPECS";
        pub const USDT_CAPPED: &str = "USDT_CAPPED";
        /// Every map the user half opens by name.
        pub const ALL: &[&str] = &[
            TARGETS,
            CONFIG,
            EXP_TABLE,
            ALLOCS,
            INFLIGHT,
            STACKS,
            STACK_TOTALS,
            COUNTERS,
            GROWTH,
            REGIONS,
            BREAKS,
            EXECS,
            HELD_CHILDREN,
            UNWIND_ROWS,
            UNWIND_PAGES,
            UNWIND_RULES,
            UNWIND_PROCS,
            ALLOCATOR_TEXT,
            CHILD_OF,
            USDT_SPECS,
        ];
    }

    /// Read-only globals, set before load.
    pub mod global {
        pub const STOP_AT_EXIT: &str = "STOP_AT_EXIT";
        pub const STOP_AT_START: &str = "STOP_AT_START";
        pub const HOLD_TGID: &str = "HOLD_TGID";
        pub const NEWTASK_PID_AT: &str = "NEWTASK_PID_AT";
        pub const NEWTASK_FLAGS_AT: &str = "NEWTASK_FLAGS_AT";
        pub const UNWIND_MODE: &str = "UNWIND_MODE";
        pub const ALL: &[&str] = &[
            STOP_AT_EXIT,
            STOP_AT_START,
            HOLD_TGID,
            NEWTASK_PID_AT,
            NEWTASK_FLAGS_AT,
            UNWIND_MODE,
        ];
    }

    /// Programs, by family.
    pub mod program {
        // Allocation entries (one per argument layout) and their one return probe.
        pub const MALLOC_ENTER: &str = "malloc_enter";
        pub const CALLOC_ENTER: &str = "calloc_enter";
        pub const REALLOC_ENTER: &str = "realloc_enter";
        pub const REALLOCARRAY_ENTER: &str = "reallocarray_enter";
        pub const POSIX_MEMALIGN_ENTER: &str = "posix_memalign_enter";
        pub const ALIGNED_ALLOC_ENTER: &str = "aligned_alloc_enter";
        pub const MEMALIGN_ENTER: &str = "memalign_enter";
        pub const VALLOC_ENTER: &str = "valloc_enter";
        pub const PVALLOC_ENTER: &str = "pvalloc_enter";
        pub const XALLOCX_ENTER: &str = "xallocx_enter";
        pub const ALLOC_RETURN: &str = "alloc_return";
        // Release.
        pub const FREE_ENTER: &str = "free_enter";
        // Heap growth.
        pub const BRK_ENTER: &str = "brk_enter";
        pub const MMAP_ENTER: &str = "mmap_enter";
        pub const MUNMAP_ENTER: &str = "munmap_enter";
        pub const MREMAP_ENTER: &str = "mremap_enter";
        pub const GROWTH_RETURN: &str = "growth_return";
        pub const PAGE_FAULT_USER: &str = "page_fault_user";
        // Process events.
        pub const PROCESS_EXEC: &str = "process_exec";
        pub const NEW_TASK: &str = "new_task";
        pub const CHILD_FAULT: &str = "child_fault";
        pub const START_ENTER: &str = "start_enter";
        pub const EXIT_ENTER: &str = "exit_enter";
        // The otel_memory USDT contract.
        pub const USDT_ALLOC: &str = "usdt_alloc";
        pub const USDT_FREE: &str = "usdt_free";
        // The benchmark's floor.
        pub const FLOOR_ENTER: &str = "floor_enter";
        pub const FLOOR_RETURN: &str = "floor_return";
        pub const FLOOR_RETURN_EMPTY: &str = "floor_return_empty";
        pub const FLOOR_FREE: &str = "floor_free";
        pub const ALL: &[&str] = &[
            MALLOC_ENTER,
            CALLOC_ENTER,
            REALLOC_ENTER,
            REALLOCARRAY_ENTER,
            POSIX_MEMALIGN_ENTER,
            ALIGNED_ALLOC_ENTER,
            MEMALIGN_ENTER,
            VALLOC_ENTER,
            PVALLOC_ENTER,
            XALLOCX_ENTER,
            ALLOC_RETURN,
            FREE_ENTER,
            BRK_ENTER,
            MMAP_ENTER,
            MUNMAP_ENTER,
            MREMAP_ENTER,
            GROWTH_RETURN,
            PAGE_FAULT_USER,
            PROCESS_EXEC,
            NEW_TASK,
            CHILD_FAULT,
            START_ENTER,
            EXIT_ENTER,
            USDT_ALLOC,
            USDT_FREE,
            FLOOR_ENTER,
            FLOOR_RETURN,
            FLOOR_RETURN_EMPTY,
            FLOOR_FREE,
        ];
    }
}
