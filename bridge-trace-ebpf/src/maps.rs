//! Every map of the kernel half, in one place. Who writes each, who reads it and who purges a
//! process's entries from it (user-side modules are `bridge-trace/src/…`):
//!
//! | map | written by | read by | purged by |
//! |---|---|---|---|
//! | TARGETS | user: `attach` (add/remove_target) | every tracepoint program | `attach::remove_target` |
//! | CONFIG | user: `attach` (sampling interval, nested frees) | `alloc`, `free`, `helpers` | never (settings) |
//! | EXP_TABLE | user: `attach` (once, at load) | `helpers::sampled` | never |
//! | SAMPLER | `helpers::sampled` (per CPU) | the same | never (per-CPU scratch) |
//! | BUSY | `helpers::guarded` (per CPU) | the same | never (per-CPU flag) |
//! | ALLOCS | `alloc::alloc_return` (insert), `free`/`alloc` (delete) | user: `collect::snapshot` | `attach::untrace_allocator` |
//! | INFLIGHT | allocation entries (insert), `alloc_return` (take) | `alloc` | `attach::untrace_allocator` |
//! | RELEASING | `free::free_enter` | `free::free_enter` | entries expire (`NESTED_FREE_NS`) |
//! | STACKS | `stack::store_stack` (once per distinct stack) | user: `collect::snapshot` | never (bounded, `MAX_STACKS`) |
//! | SCRATCH | `stack::capture_stack` (per CPU) | `stack` | never (per-CPU scratch) |
//! | ROW_CACHE | `stack::find_row` (per CPU) | `stack` | a generation change (user: `unwind`) |
//! | STACK_TOTALS | `alloc`, `free` (per CPU) | user: `collect::status` | `attach::untrace_allocator` |
//! | COUNTERS | every program, through `helpers::count` | user: `collect::counters` | never (whole run) |
//! | GROWTH | `growth` (per CPU) | user: `collect::snapshot` | `attach::remove_target` |
//! | REGIONS | `growth` (map_region/unmap) | user: `collect::snapshot` | `attach::remove_target` |
//! | SYSCALLS | growth entries (insert), `growth_return` (take) | `growth` | consumed at return |
//! | BREAKS | `growth` (brk) | `growth` | `attach::remove_target` |
//! | UNWIND_ROWS, UNWIND_PAGES, UNWIND_RULES | user: `unwind` (memory-mapped) | `stack::find_row` | user: `unwind` (tables reused) |
//! | UNWIND_PROCS | user: `unwind` | `stack::find_row` | user: `unwind::forget` |
//! | EXECS | `process::process_exec` | user: `collect::snapshot` | `attach::remove_target` |
//! | FORKED | `process::new_task` (insert), `process::child_fault` (take) | `process` | consumed at the child's first fault |
//! | ALLOCATOR_TEXT | user: `attach::note_allocator_text` | `free::free_enter` | `attach::remove_target` |
//! | CHILD_OF | `process::child_fault` | `free::free_enter` | user: `attach::remove_target` |
//! | VFORKED | `process::new_task` (insert), `process::process_exec` (take) | `process` | consumed at the child's exec |
//! | HELD_CHILDREN | `process::child_fault` | user: `attach::held_children` | user: `attach::release_child` |
//! | USDT_SPECS | user: `attach::usdt` (one slot per probe site of each process) | `usdt` | user: `attach::usdt` (slots reused) |
//! | USDT_REGS | `usdt` (per CPU) | the same | never (per-CPU scratch) |
//! | TOTALS_SCRATCH | `alloc::credit`, a stack's first totals (per CPU) | the same (the insert) | never (per-CPU scratch) |
//! | USDT_CAPPED | user: `attach::usdt::cap_usdt` (a process at its cap of live samples) | `usdt::usdt_alloc` | user: `attach::usdt::cap_usdt`, `attach::untrace_allocator` |
//! | FLOOR_STACK | `floor` (per CPU) | nobody (the floor measures the write) | never |
//!
//! The names the user half opens maps by are `bridge_trace_common::names::map`.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};
use bridge_trace_common::*;

use crate::stack::{RowCache, Walk};

/// The processes being traced (tgid → 1; user-written). Uprobes are also attached for these
/// pids only; the check keeps a stray event from another process out of the maps, and is what
/// the system-wide tracepoints filter on.
#[map]
pub(crate) static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Settings changed while tracing, indexed by [`config`] (user-written).
#[map]
pub(crate) static CONFIG: Array<u64> = Array::with_max_entries(config::COUNT, 0);

/// Quantiles of the unit exponential distribution, fixed point (user-written once): the
/// sampler's intervals are drawn from them.
#[map]
pub(crate) static EXP_TABLE: Array<u32> = Array::with_max_entries(EXP_QUANTILES, 0);

/// Per CPU: bytes still to be allocated before the next sampled allocation (0: not drawn yet).
#[map]
pub(crate) static SAMPLER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: 1 while one of the guarded programs runs there ([`crate::helpers::guarded`]).
#[map]
pub(crate) static BUSY: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Heap growth per stack, per CPU: written by the growth tracepoints.
#[map]
pub(crate) static GROWTH: PerCpuHashMap<StackKey, GrowthTotals> =
    PerCpuHashMap::with_max_entries(MAX_STACKS, 0);

/// Anonymous regions the targets mapped while traced: (tgid, start) → length, stack.
#[map]
pub(crate) static REGIONS: HashMap<AllocKey, MmapRegion> =
    HashMap::with_max_entries(MAX_REGIONS, 0);

/// Heap-growth calls in progress, per thread id: written at entry, consumed at return.
#[map]
pub(crate) static SYSCALLS: HashMap<u32, PendingSyscall> =
    HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Each target's program break as last seen (tgid → address).
#[map]
pub(crate) static BREAKS: HashMap<u32, u64> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Rows of every loaded object's unwind table, each table sorted by address (user-written,
/// memory-mapped by the user half).
#[map]
pub(crate) static UNWIND_ROWS: Array<UnwindRow> =
    Array::with_max_entries(MAX_UNWIND_ROWS, BPF_F_MMAPABLE);

/// Page index of every loaded table: for each 4 KiB page of code, the rows to search
/// (user-written, memory-mapped by the user half).
#[map]
pub(crate) static UNWIND_PAGES: Array<UnwindPage> =
    Array::with_max_entries(MAX_UNWIND_PAGES, BPF_F_MMAPABLE);

/// Per CPU: rows found lately (see [`RowCache`]).
#[map]
pub(crate) static ROW_CACHE: PerCpuArray<RowCache> = PerCpuArray::with_max_entries(1, 0);

/// Every distinct unwind rule of the loaded tables, referred to by rows (user-written,
/// memory-mapped by the user half).
#[map]
pub(crate) static UNWIND_RULES: Array<UnwindRule> =
    Array::with_max_entries(MAX_UNWIND_RULES, BPF_F_MMAPABLE);

/// Per process: its executable mappings and where their tables are in [`UNWIND_ROWS`]
/// (user-written).
#[map]
pub(crate) static UNWIND_PROCS: HashMap<u32, ProcUnwind> =
    HashMap::with_max_entries(MAX_UNWIND_PROCS, 0);

/// Live allocations: (tgid, address) → size, time, stack. Written by the return probe (insert)
/// and by `free`/realloc (delete).
#[map]
pub(crate) static ALLOCS: HashMap<AllocKey, AllocInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_ALLOCS, 0);

/// Allocator calls in progress, per thread id: written by the entry probes, consumed by the
/// return probe.
#[map]
pub(crate) static INFLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Call stacks by hash of their frames: written once per distinct stack by the entry probes.
#[map]
pub(crate) static STACKS: HashMap<u64, StackFrames> = HashMap::with_max_entries(MAX_STACKS, 0);

/// The stack walk in progress (too large for the 512-byte BPF stack).
#[map]
pub(crate) static SCRATCH: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// Bytes and counts allocated and freed per stack, per CPU: written on every allocation and free.
#[map]
pub(crate) static STACK_TOTALS: PerCpuHashMap<StackKey, StackTotals> =
    PerCpuHashMap::with_max_entries(MAX_STACKS, 0);

/// Event and failure counters, per CPU, indexed by [`Counter`].
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Per thread, its last release, while nested releases are possible ([`free_enter`]).
#[map]
pub(crate) static RELEASING: HashMap<u32, Releasing> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// The last exec of each target (monotonic ns): whatever it allocated before went with its old
/// image, and user space drops those allocations ([`process_exec`]).
#[map]
pub(crate) static EXECS: HashMap<u32, u64> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Children a target forked that have not faulted yet: child pid → parent tgid.
#[map]
pub(crate) static FORKED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Per target: where its allocator objects' code is mapped ([`TextRanges`]).
#[map]
pub(crate) static ALLOCATOR_TEXT: HashMap<u32, TextRanges> =
    HashMap::with_max_entries(MAX_TARGETS, 0);

/// Followed children: child pid → the target that forked it (its blocks from before the
/// fork are the parent's, under the parent's key).
#[map]
pub(crate) static CHILD_OF: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Children a target started sharing its memory (vfork, posix_spawn: a shell running a
/// command) that have not exec'ed yet: child pid → parent tgid. At its exec the child is
/// remembered in [`FORKED`], to be held at the first fault of its new image.
#[map]
pub(crate) static VFORKED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Children held (SIGSTOP) at their first fault: child pid → parent tgid. The user half
/// attaches their probes, sends SIGCONT and removes the entry.
#[map]
pub(crate) static HELD_CHILDREN: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Where each `otel_memory` probe site finds its arguments, by the cookie of its probe
/// (user-written from the site's SDT descriptors).
#[map]
pub(crate) static USDT_SPECS: Array<UsdtSpec> = Array::with_max_entries(MAX_USDT_SPECS, 0);

/// Per CPU: a stack's first totals, built here and inserted from here, not on the 512-byte
/// BPF stack (a `StackTotals` is 128 bytes).
#[map]
pub(crate) static TOTALS_SCRATCH: PerCpuArray<StackTotals> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the registers of the `otel_memory` probe running there, copied to be read at the
/// slots the site's spec names.
#[map]
pub(crate) static USDT_REGS: PerCpuArray<Regs> = PerCpuArray::with_max_entries(1, 0);

/// The processes that hold as many live samples as their cap: their new samples are counted
/// ([`Counter::UsdtCapped`]) and not kept, so that one process cannot fill `ALLOCS` for all.
#[map]
pub(crate) static USDT_CAPPED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Per CPU: where the floor's return probe puts the user stack it captures.
#[map]
pub(crate) static FLOOR_STACK: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);
