//! `libbridge_trace_sampler.so`: a preloadable library that samples a process's heap from
//! inside it and emits the OpenTelemetry `otel_memory` USDT contract ([`usdt`]), so that a
//! tracer pays a probe hit only for sampled allocations and their frees.
//!
//! It interposes the malloc family in front of whatever allocator the process uses
//! ([`real`]) and changes nothing the application can observe except time: every block is
//! the allocator's own, unchanged (no header), and a sampled block is recognised at its free
//! by a side table ([`table`]). With no tracer attached the alloc semaphore is zero and each
//! call costs one load and a branch more ([`sample`] is not even reached); a free costs one
//! load while no sampled block is held.
//!
//! Pipeline of one call: semaphore → [`sample::take`] → the allocator → [`table::insert`] →
//! `otel_memory:alloc`; at the free: [`table::remove`] → `otel_memory:free` → the allocator.
use core::ffi::{c_int, c_void};

mod real;
mod sample;
mod table;
mod usdt;

use real::{func, Aligned, Arena, Calloc, Free, Malloc, PosixMemalign, Realloc, UsableSize, F};

/// Reports a block the allocator returned if `weight` says it was sampled and the table has
/// room for it.
#[inline(always)]
fn report(p: *mut c_void, size: usize, weight: Option<u64>) {
    if let Some(w) = weight {
        if !p.is_null() && table::insert(p as usize, w) {
            usdt::alloc(p as usize, size, w);
        }
    }
}

/// Whether an allocation of `size` bytes is sampled (and with what weight): never while no
/// tracer holds the semaphore.
#[inline(always)]
fn sampled(size: usize) -> Option<u64> {
    if usdt::alloc_enabled() {
        sample::take(size)
    } else {
        None
    }
}

/// Forgets `p` if it was sampled, telling the tracer, before the allocator may reuse it.
#[inline(always)]
fn release(p: *mut c_void) -> Option<u64> {
    let w = table::remove(p as usize)?;
    usdt::free(p as usize);
    Some(w)
}

/// # Safety
/// As C's `malloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    let Some(m) = func::<Malloc>(F::Malloc) else {
        return Arena::alloc(size, 16);
    };
    let w = sampled(size);
    // SAFETY: the allocator's own malloc, with the caller's arguments.
    let p = unsafe { m(size) };
    report(p, size, w);
    p
}

/// # Safety
/// As C's `calloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(c) = func::<Calloc>(F::Calloc) else {
        return n
            .checked_mul(size)
            .map_or(core::ptr::null_mut(), |b| Arena::alloc(b, 16));
    };
    let w = n.checked_mul(size).and_then(sampled);
    // SAFETY: the allocator's own calloc, with the caller's arguments.
    let p = unsafe { c(n, size) };
    report(p, n.wrapping_mul(size), w);
    p
}

/// # Safety
/// As C's `free`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() || Arena::contains(p) {
        return;
    }
    release(p);
    if let Some(f) = func::<Free>(F::Free) {
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
        // SAFETY: realloc(NULL, n) is malloc(n).
        return unsafe { malloc(size) };
    }
    if Arena::contains(p) {
        // SAFETY: as malloc.
        let q = unsafe { malloc(size) };
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
            if let Some(w) = held {
                let usable = func::<UsableSize>(F::UsableSize)
                    // SAFETY: `p` is still the allocator's block.
                    .map_or(size, |u| unsafe { u(p) });
                report(p, usable, Some(w));
            }
        }
        return q;
    }
    report(q, size, sampled(size));
    q
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
        // SAFETY: set by the allocator on success.
        report(unsafe { *out }, size, w);
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
    report(p, size, w);
    p
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
    report(p, size, w);
    p
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
    // SAFETY: the allocator's own function on a block it returned.
    func::<UsableSize>(F::UsableSize).map_or(0, |u| unsafe { u(p) })
}
