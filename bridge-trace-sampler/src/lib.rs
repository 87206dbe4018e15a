//! `libbridge_trace_sampler.so`: a preloadable library that samples a process's heap from
//! inside it and emits the OpenTelemetry `otel_memory` USDT contract ([`usdt`]), so that a
//! tracer pays a probe hit only for sampled allocations and their frees.
//!
//! It interposes the malloc family in front of whatever allocator the process uses
//! ([`real`]) and changes nothing the application can observe except time: every block is
//! the allocator's own, unchanged (no header), and a sampled block is recognised at its free
//! by a side table ([`table`]). With no tracer attached the alloc semaphore is zero and each
//! call costs one load and a branch more ([`sample`] is not even reached); a free costs one
//! load while no sampled block is held, and the same load and a test of the pointer's low
//! bits while those held are on a [`table::MARK`].
//!
//! A sampled block is moved to a mark ([`place`]): allocated again, aligned, and the first
//! one released. `malloc_usable_size` still answers what the allocator said for the first
//! (kept in the table); what else differs is where the block is, and up to a mark of slack
//! per held sample (0.8 % of the heap the samples stand for at the default interval): blocks
//! up to [`SPARE_LIMIT`] are asked for in whole marks, so that the last sampled block the
//! program freed, kept for the next move ([`SPARE`]), holds the next sample, and a move
//! mostly costs no aligned allocation.
//!
//! Pipeline of one call: semaphore → [`sample::reached`] (not reached: a jump to the
//! allocator, from a function that saves no register) → [`sample::weigh`] → the allocator →
//! [`place`] →
//! [`table::insert`] → `otel_memory:alloc`; at the free: [`table::remove`] →
//! `otel_memory:free` → the allocator.
use core::{
    ffi::{c_int, c_void},
    sync::atomic::{AtomicUsize, Ordering},
};

mod real;
mod sample;

/// Tests that set the sampler's globals (the interval, the allocator's resolution) one at a time.
#[cfg(test)]
static TEST_GLOBALS: std::sync::Mutex<()> = std::sync::Mutex::new(());
mod inject;
mod table;
mod usdt;

use real::{func, Aligned, Arena, Calloc, Free, Malloc, PosixMemalign, Realloc, UsableSize, F};

/// Reports a block the allocator returned if `weight` says it was sampled (moved to a mark
/// first, as `init` says: see [`place`]) and the table has room for it; returns the block the
/// program gets.
#[inline(always)]
fn report(p: *mut c_void, size: usize, weight: Option<u64>, init: Init) -> *mut c_void {
    match weight {
        Some(w) if !p.is_null() => sample(p, size, w, init),
        _ => p,
    }
}

/// The allocator's usable size for a block of its own; `size` when it has no such function.
fn usable_of(p: *mut c_void, size: usize) -> usize {
    // SAFETY: the allocator's own function on a block it returned.
    func::<UsableSize>(F::UsableSize).map_or(size, |u| unsafe { u(p) })
}

#[cold]
#[inline(never)]
fn sample(p: *mut c_void, size: usize, w: u64, init: Init) -> *mut c_void {
    let (q, usable) = place(p, size, init);
    remember(q, size, w, usable);
    q
}

/// Holds the sampled block `p` and tells the tracer, if the table has room for it.
fn remember(p: *mut c_void, size: usize, w: u64, usable: usize) {
    if table::insert(p as usize, w, usable) {
        usdt::alloc(p as usize, size, w);
    }
}

/// What a moved block must hold of the first: nothing (malloc), zeros (calloc), or its first
/// `size` bytes (realloc).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Init {
    None,
    Zero,
    Copy,
}

/// The sampled block `p` of `size` bytes moved to a [`table::MARK`] where it is not on one,
/// and the usable size the program is told: the allocator's for `p`. Stays put below
/// [`sample::on_mark`]'s interval, above [`table::MOVE_LIMIT`], and when the aligned
/// allocation fails.
fn place(p: *mut c_void, size: usize, init: Init) -> (*mut c_void, usize) {
    let usable = usable_of(p, size);
    if p as usize & (table::MARK - 1) == 0 || !sample::on_mark() || size > table::MOVE_LIMIT {
        return (p, usable);
    }
    let (Some(pm), Some(f)) = (
        func::<PosixMemalign>(F::PosixMemalign),
        func::<Free>(F::Free),
    ) else {
        return (p, usable);
    };
    let q = match take_spare(size, f) {
        Some(q) => q,
        None => {
            let mut q = core::ptr::null_mut();
            // Whole marks up to the spare's limit, so that the block, once freed and kept,
            // holds the next sample whatever its size: the slack is the mark's worth the
            // move may cost anyway (see [`sample::on_mark`]).
            let ask = if size <= SPARE_LIMIT {
                size.max(1).next_multiple_of(table::MARK)
            } else {
                size
            };
            // SAFETY: the allocator's own posix_memalign with a valid out-pointer.
            if unsafe { pm(&mut q, table::MARK, ask) } != 0 || q.is_null() {
                return (p, usable);
            }
            q
        }
    };
    // The program may use what the allocator said `p` has; `q` has at least as much, as a
    // block of the same size or more, unless an allocator says otherwise.
    let usable = usable.min(usable_of(q, size)).max(size);
    // SAFETY: both blocks are the allocator's, distinct, and hold at least `usable` bytes
    // (`size` of them for the copy).
    unsafe {
        match init {
            Init::None => {}
            Init::Zero => core::ptr::write_bytes(q as *mut u8, 0, usable),
            Init::Copy => core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, size),
        }
        f(p);
    }
    (q, usable)
}

/// A sampled block on a mark that the program freed, kept (0: none) for the next sample to
/// move to instead of making an aligned allocation: glibc's `posix_memalign` of a page costs
/// little itself but, in a heap whose blocks come and go as fast as alloc-loop's, ~9 µs a
/// sample in the calls that follow (the split-off pieces it leaves in the bins). One block,
/// the allocator's own, at most [`SPARE_LIMIT`] bytes, given back when another replaces it.
static SPARE: AtomicUsize = AtomicUsize::new(0);
/// The largest freed sample kept as the [`SPARE`].
const SPARE_LIMIT: usize = 16 << 10;

/// Keeps `p`, a sampled block the program freed, told `usable` bytes, as the [`SPARE`] if it
/// is on a mark and small enough, and samples are moved (none would take it otherwise); true
/// if kept (the one it replaces goes to the allocator).
fn keep_spare(p: *mut c_void, usable: usize, f: Free) -> bool {
    if p as usize & (table::MARK - 1) != 0 || usable > SPARE_LIMIT || !sample::on_mark() {
        return false;
    }
    let old = SPARE.swap(p as usize, Ordering::AcqRel);
    if old != 0 {
        // SAFETY: the allocator's block, no longer the spare, nobody else's.
        unsafe { f(old as *mut c_void) };
    }
    true
}

/// The [`SPARE`], taken, if it holds `size` bytes (if not, it goes back to the allocator).
fn take_spare(size: usize, f: Free) -> Option<*mut c_void> {
    let s = SPARE.swap(0, Ordering::AcqRel) as *mut c_void;
    if s.is_null() {
        return None;
    }
    // Without the allocator's usable size (0 then), the spare is not trusted to hold `size`.
    if usable_of(s, 0) >= size.max(1) {
        return Some(s);
    }
    // SAFETY: the allocator's block, taken from the spare: this call's alone.
    unsafe { f(s) };
    None
}

/// Whether an allocation of `size` bytes is sampled (and with what weight): never while no
/// tracer holds the semaphore.
#[inline(always)]
fn sampled(size: usize) -> Option<u64> {
    if reaches(size) {
        sample::weigh()
    } else {
        None
    }
}

/// Whether an allocation of `size` bytes reached a sample point ([`sample::weigh`] next):
/// never while no tracer holds the semaphore.
#[inline(always)]
fn reaches(size: usize) -> bool {
    usdt::alloc_enabled() && sample::reached(size)
}

/// Forgets `p` if it was sampled, telling the tracer, before the allocator may reuse it.
#[inline(always)]
fn release(p: *mut c_void) -> Option<table::Held> {
    let w = table::remove(p as usize)?;
    usdt::free(p as usize);
    Some(w)
}

/// # Safety
/// As C's `malloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    alloc(size)
}

/// `malloc`, also for the calls made inside this library: an injected library's own
/// references to `malloc` are bound to the process's allocator, not to it. Unsampled, a jump
/// to the allocator's malloc: the sampled path is a function apart, so that this one saves
/// no register.
#[inline(always)]
fn alloc(size: usize) -> *mut c_void {
    let Some(m) = real::ready::<Malloc>(F::Malloc) else {
        return alloc_unresolved(size);
    };
    if !reaches(size) {
        // SAFETY: the allocator's own malloc, with the caller's arguments.
        return unsafe { m(size) };
    }
    alloc_sampled(m, size)
}

/// [`alloc`] before the allocator's functions are published: once resolved, as any other.
#[cold]
#[inline(never)]
extern "C" fn alloc_unresolved(size: usize) -> *mut c_void {
    match func::<Malloc>(F::Malloc) {
        Some(_) => alloc(size),
        None => Arena::alloc(size, 16),
    }
}

/// [`alloc`] of an allocation that reached a sample point.
#[cold]
#[inline(never)]
extern "C" fn alloc_sampled(m: Malloc, size: usize) -> *mut c_void {
    let w = sample::weigh();
    // SAFETY: the allocator's own malloc, with the caller's arguments.
    let p = unsafe { m(size) };
    report(p, size, w, Init::None)
}

/// # Safety
/// As C's `calloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(c) = real::ready::<Calloc>(F::Calloc) else {
        return calloc_unresolved(n, size);
    };
    if !n.checked_mul(size).is_some_and(reaches) {
        // SAFETY: the allocator's own calloc, with the caller's arguments.
        return unsafe { c(n, size) };
    }
    calloc_sampled(c, n, size)
}

/// `calloc` before the allocator's functions are published.
#[cold]
#[inline(never)]
extern "C" fn calloc_unresolved(n: usize, size: usize) -> *mut c_void {
    match func::<Calloc>(F::Calloc) {
        // SAFETY: as the caller's.
        Some(_) => unsafe { calloc(n, size) },
        None => n
            .checked_mul(size)
            .map_or(core::ptr::null_mut(), |b| Arena::alloc(b, 16)),
    }
}

/// `calloc` of an allocation that reached a sample point.
#[cold]
#[inline(never)]
extern "C" fn calloc_sampled(c: Calloc, n: usize, size: usize) -> *mut c_void {
    let w = sample::weigh();
    // SAFETY: the allocator's own calloc, with the caller's arguments.
    let p = unsafe { c(n, size) };
    report(p, n * size, w, Init::Zero)
}

/// # Safety
/// As C's `free`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() || Arena::contains(p) {
        return;
    }
    if table::maybe_held(p as usize) {
        return free_held(p);
    }
    match real::ready::<Free>(F::Free) {
        // SAFETY: the allocator's own free of a block it returned.
        Some(f) => unsafe { f(p) },
        None => free_unresolved(p),
    }
}

/// `free` before the allocator's functions are published (a block of the arena was let go
/// above; one of the allocator's cannot be here without its `free`).
#[cold]
#[inline(never)]
extern "C" fn free_unresolved(p: *mut c_void) {
    if let Some(f) = func::<Free>(F::Free) {
        // SAFETY: the allocator's own free of a block it returned.
        unsafe { f(p) }
    }
}

/// `free` of a block the table may hold (a function apart, so that `free` saves no
/// register).
#[inline(never)]
extern "C" fn free_held(p: *mut c_void) {
    let held = release(p);
    if let Some(f) = func::<Free>(F::Free) {
        if held.is_some_and(|h| keep_spare(p, h.usable, f)) {
            return;
        }
        // SAFETY: the allocator's own free of a block it returned.
        unsafe { f(p) }
    }
}

/// # Safety
/// As C's `realloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: as the caller's.
    unsafe { resize(p, size) }
}

/// # Safety
/// As C's `realloc`.
unsafe fn resize(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        // realloc(NULL, n) is malloc(n).
        return alloc(size);
    }
    if Arena::contains(p) {
        let q = alloc(size);
        if !q.is_null() {
            let n = Arena::size(p).min(size);
            // SAFETY: both blocks hold at least `n` bytes and are distinct.
            unsafe { core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, n) };
        }
        return q;
    }
    let Some(r) = func::<Realloc>(F::Realloc) else {
        return core::ptr::null_mut();
    };
    // The old block's sample ends before the allocator can hand its address to another thread.
    let held = release(p);
    // SAFETY: the allocator's own realloc of a block it returned.
    let q = unsafe { r(p, size) };
    if q.is_null() {
        if size != 0 {
            // Failed: the old block is untouched, and still sampled.
            if let Some(h) = held {
                remember(p, h.usable, h.weight, h.usable);
            }
        }
        return q;
    }
    report(q, size, sampled(size), Init::Copy)
}

/// # Safety
/// As glibc's `reallocarray`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: as realloc.
        Some(bytes) => unsafe { resize(p, bytes) },
        None => {
            // SAFETY: errno is this thread's.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            core::ptr::null_mut()
        }
    }
}

/// # Safety
/// As C's `posix_memalign`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    let Some(pm) = func::<PosixMemalign>(F::PosixMemalign) else {
        let p = Arena::alloc(size, align);
        if p.is_null() {
            return libc::ENOMEM;
        }
        // SAFETY: the caller's out-pointer.
        unsafe { *out = p };
        return 0;
    };
    let w = sampled(size);
    // SAFETY: the allocator's own posix_memalign, with the caller's arguments.
    let rc = unsafe { pm(out, align, size) };
    if rc == 0 {
        // SAFETY: set by the allocator on success; the caller's out-pointer.
        unsafe { *out = report(*out, size, w, Init::None) };
    }
    rc
}

/// An aligned allocation through the allocator's `f`, or the arena before it is known.
#[inline(always)]
fn aligned(f: F, align: usize, size: usize) -> *mut c_void {
    let Some(a) = func::<Aligned>(f) else {
        return Arena::alloc(size, align.next_power_of_two());
    };
    let w = sampled(size);
    // SAFETY: the allocator's own function, with the caller's arguments.
    let p = unsafe { a(align, size) };
    report(p, size, w, Init::None)
}

/// # Safety
/// As C's `aligned_alloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    aligned(F::AlignedAlloc, align, size)
}

/// # Safety
/// As glibc's `memalign`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    aligned(F::Memalign, align, size)
}

/// A page-aligned allocation through the allocator's `f` (valloc, pvalloc).
#[inline(always)]
fn paged(f: F, size: usize) -> *mut c_void {
    let Some(m) = func::<Malloc>(f) else {
        return Arena::alloc(size, 4096);
    };
    let w = sampled(size);
    // SAFETY: the allocator's own function, with the caller's argument.
    let p = unsafe { m(size) };
    report(p, size, w, Init::None)
}

/// # Safety
/// As glibc's `valloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    paged(F::Valloc, size)
}

/// # Safety
/// As glibc's `pvalloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    paged(F::Pvalloc, size)
}

/// # Safety
/// As glibc's `malloc_usable_size`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    if Arena::contains(p) {
        return Arena::size(p);
    }
    if let Some(u) = table::usable(p as usize) {
        return u;
    }
    // SAFETY: the allocator's own function on a block it returned.
    func::<UsableSize>(F::UsableSize).map_or(0, |u| unsafe { u(p) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sampled block is moved to a mark with its contents (realloc) or zeros (calloc) and
    /// the usable size the allocator gave the first; a big one stays put.
    #[test]
    fn sampled_blocks_move_to_a_mark() {
        let _g = TEST_GLOBALS.lock().unwrap();
        sample::configure_moves(Some(b"1"));
        let m = func::<Malloc>(F::Malloc).unwrap();
        let f = func::<Free>(F::Free).unwrap();
        for (init, fill) in [(Init::Copy, 0x5a_u8), (Init::Zero, 0xff), (Init::None, 1)] {
            // SAFETY: the allocator's own calls; `p` holds 1000 bytes.
            let mut p = unsafe { m(1000) };
            while (p as usize).is_multiple_of(table::MARK) {
                // On a mark already (the last one's, reused): another, off one.
                p = unsafe { m(1000) };
            }
            unsafe { core::ptr::write_bytes(p as *mut u8, fill, 1000) };
            let usable = usable_of(p, 1000);
            let (q, told) = place(p, 1000, init);
            assert_eq!(q as usize % table::MARK, 0);
            assert_eq!(told, usable);
            // SAFETY: `q` holds at least `told` bytes.
            let bytes = unsafe { core::slice::from_raw_parts(q as *const u8, told) };
            match init {
                Init::Copy => assert!(bytes[..1000].iter().all(|b| *b == fill)),
                Init::Zero => assert!(bytes.iter().all(|b| *b == 0)),
                Init::None => {}
            }
            // SAFETY: the allocator's block.
            unsafe { f(q) };
        }
        // SAFETY: as above.
        let big = unsafe { m(table::MOVE_LIMIT + 1) };
        assert_eq!(place(big, table::MOVE_LIMIT + 1, Init::None).0, big);
        unsafe { f(big) };
    }

    /// The last sampled block freed (on a mark, small enough) is where the next sample moves
    /// to; one too small for the next goes back to the allocator; one off a mark is not kept.
    #[test]
    fn a_freed_sample_is_the_next_ones_mark() {
        let _g = TEST_GLOBALS.lock().unwrap();
        sample::configure_moves(Some(b"1"));
        let m = func::<Malloc>(F::Malloc).unwrap();
        let f = func::<Free>(F::Free).unwrap();
        let off_mark = |n: usize| loop {
            // SAFETY: the allocator's own malloc.
            let p = unsafe { m(n) };
            if !(p as usize).is_multiple_of(table::MARK) {
                return p;
            }
        };
        // A spare left by another test goes first.
        if let Some(s) = take_spare(0, f) {
            unsafe { f(s) };
        }
        let (q, _) = place(off_mark(1000), 1000, Init::None);
        assert!(keep_spare(q, 1000, f));
        let (q2, told) = place(off_mark(900), 900, Init::Zero);
        assert_eq!(q2, q, "moved to the spare");
        // SAFETY: `q2` holds `told` bytes.
        assert!(
            unsafe { core::slice::from_raw_parts(q2 as *const u8, told) }
                .iter()
                .all(|b| *b == 0)
        );
        assert!(keep_spare(q2, 900, f));
        let (q3, told) = place(off_mark(8000), 8000, Init::None);
        assert_eq!(q3 as usize % table::MARK, 0);
        assert!(told >= 8000);
        assert_eq!(
            SPARE.load(Ordering::Relaxed),
            0,
            "the small spare was given back"
        );
        let p = off_mark(100);
        assert!(!keep_spare(p, 100, f));
        assert!(!keep_spare(q3, SPARE_LIMIT + 1, f));
        sample::configure_moves(Some(b"0"));
        assert!(!keep_spare(q3, 100, f), "kept while samples are not moved");
        sample::configure_moves(Some(b"1"));
        // SAFETY: the allocator's blocks.
        unsafe {
            f(p);
            f(q3);
        }
    }
}
