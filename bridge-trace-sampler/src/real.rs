//! The allocator underneath: each malloc-family function of the next object in the lookup
//! order (`dlsym(RTLD_NEXT)`: glibc, or jemalloc, mimalloc, tcmalloc linked or preloaded
//! after this library), resolved at the first call. The first calls can arrive before
//! `dlsym` answers, and `dlsym` itself may allocate: those are served from [`Arena`], a
//! static bump area whose blocks are never released.
use core::{
    ffi::{c_char, c_int, c_void},
    ptr::null_mut,
    sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering},
};

pub type Malloc = unsafe extern "C" fn(usize) -> *mut c_void;
pub type Calloc = unsafe extern "C" fn(usize, usize) -> *mut c_void;
pub type Realloc = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
pub type Free = unsafe extern "C" fn(*mut c_void);
pub type PosixMemalign = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;
pub type Aligned = unsafe extern "C" fn(usize, usize) -> *mut c_void;
pub type UsableSize = unsafe extern "C" fn(*mut c_void) -> usize;

/// The functions of the allocator underneath, by name, in [`NAMES`] order.
#[derive(Clone, Copy)]
#[repr(usize)]
pub enum F {
    Malloc,
    Calloc,
    Realloc,
    Free,
    PosixMemalign,
    AlignedAlloc,
    Memalign,
    Valloc,
    Pvalloc,
    UsableSize,
}

const NAMES: [&[u8]; 10] = [
    b"malloc\0",
    b"calloc\0",
    b"realloc\0",
    b"free\0",
    b"posix_memalign\0",
    b"aligned_alloc\0",
    b"memalign\0",
    b"valloc\0",
    b"pvalloc\0",
    b"malloc_usable_size\0",
];

static FNS: [AtomicPtr<c_void>; 10] = [const { AtomicPtr::new(null_mut()) }; 10];

const UNRESOLVED: u8 = 0;
const RESOLVING: u8 = 1;
const READY: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNRESOLVED);

/// The next allocator's `f`, or null when it is not resolved yet (or has no such function):
/// the caller then serves the call from the [`Arena`] (or fails it). One load: the functions
/// are published only once all are resolved and the sampler configured.
#[inline(always)]
pub fn get(f: F) -> *mut c_void {
    let p = FNS[f as usize].load(Ordering::Acquire);
    if p.is_null() {
        return get_unresolved(f);
    }
    p
}

/// [`get`] before the functions are published, or of one the allocator does not have.
#[cold]
#[inline(never)]
fn get_unresolved(f: F) -> *mut c_void {
    if STATE.load(Ordering::Acquire) != READY {
        resolve();
    }
    FNS[f as usize].load(Ordering::Acquire)
}

#[cold]
fn resolve() {
    if STATE
        .compare_exchange(UNRESOLVED, RESOLVING, Ordering::Acquire, Ordering::Acquire)
        .is_err()
    {
        // Resolving on this thread (dlsym allocating) or another: the arena serves meanwhile.
        return;
    }
    // RTLD_NEXT asks for the next definition after ours.
    let fns = lookup(libc::RTLD_NEXT);
    crate::sample::configure(env(c"BRIDGE_TRACE_SAMPLE_INTERVAL"));
    crate::sample::configure_moves(env(c"BRIDGE_TRACE_SAMPLE_MOVE"));
    publish(&fns);
}

/// Injected ([`crate::inject`]): the allocator is the process's own, the first definition in
/// its global scope (the executable's, a jemalloc it links, or libc's), which this library,
/// loaded with `RTLD_LOCAL`, is not part of. `RTLD_NEXT` would search this library's own
/// dependencies: libc's, whatever the process allocates with. Idempotent; nothing changes
/// when the functions were resolved before, as they are when the library is preloaded.
pub fn resolve_global() {
    if STATE
        .compare_exchange(UNRESOLVED, RESOLVING, Ordering::Acquire, Ordering::Acquire)
        .is_ok()
    {
        publish(&lookup(libc::RTLD_DEFAULT));
    }
}

/// The allocator's functions in `scope`, in [`NAMES`] order (null for one it lacks). `dlsym`
/// may allocate meanwhile: the arena serves it.
fn lookup(scope: *mut c_void) -> [*mut c_void; NAMES.len()] {
    // SAFETY: NUL-terminated names and one of dlsym's pseudo-handles.
    NAMES.map(|name| unsafe { libc::dlsym(scope, name.as_ptr() as *const c_char) })
}

/// Makes the functions found the ones every call takes, and the state ready.
fn publish(fns: &[*mut c_void; NAMES.len()]) {
    for (slot, &p) in FNS.iter().zip(fns) {
        slot.store(p, Ordering::Release);
    }
    STATE.store(READY, Ordering::Release);
}

/// Whether the allocator's functions are resolved.
pub fn resolved() -> bool {
    STATE.load(Ordering::Acquire) == READY
}

/// An environment variable's value; getenv does not allocate.
fn env(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: a NUL-terminated name.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: getenv returned a NUL-terminated string that lives as long as the environment.
    (!v.is_null()).then(|| unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes())
}

/// The next allocator's `f` as `T`, resolving it first if need be; `None` while it cannot be
/// (the caller serves the call from the [`Arena`]) or when the allocator has none.
#[inline(always)]
pub fn func<T: Copy>(f: F) -> Option<T> {
    as_fn(get(f))
}

/// The next allocator's `f` as `T` once published, `None` before: one load, and no call on
/// the hot path that a caller would save its registers around (its `None` path, a function
/// apart, resolves with [`func`]).
#[inline(always)]
pub fn ready<T: Copy>(f: F) -> Option<T> {
    as_fn(FNS[f as usize].load(Ordering::Acquire))
}

#[inline(always)]
fn as_fn<T: Copy>(p: *mut c_void) -> Option<T> {
    if p.is_null() {
        return None;
    }
    debug_assert_eq!(
        core::mem::size_of::<T>(),
        core::mem::size_of::<*mut c_void>()
    );
    // SAFETY: `T` is the function pointer type of `f` (the callers name both together).
    Some(unsafe { core::mem::transmute_copy::<*mut c_void, T>(&p) })
}

/// Where calls made before the allocator underneath is known are served: 1 MiB, 16-byte
/// blocks each preceded by its size, never released.
pub struct Arena;

const ARENA_SIZE: usize = 1 << 20;

#[repr(C, align(4096))]
struct ArenaBytes([u8; ARENA_SIZE]);

static mut ARENA: ArenaBytes = ArenaBytes([0; ARENA_SIZE]);
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

impl Arena {
    fn base() -> usize {
        &raw const ARENA as usize
    }

    /// A zeroed block of `size` bytes aligned to `align` (a power of two, at least 16), or
    /// null when the arena is spent.
    #[cold]
    #[inline(never)]
    pub fn alloc(size: usize, align: usize) -> *mut c_void {
        let align = align.max(16);
        let mut used = ARENA_USED.load(Ordering::Relaxed);
        loop {
            let start = (Self::base() + used + 16).next_multiple_of(align);
            let end = match start.checked_add(size) {
                Some(e) if e <= Self::base() + ARENA_SIZE => e,
                _ => return null_mut(),
            };
            let next = end - Self::base();
            match ARENA_USED.compare_exchange(used, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    // SAFETY: the 8 bytes before `start` are inside this block's reservation.
                    unsafe { *((start - 8) as *mut usize) = size };
                    return start as *mut c_void;
                }
                Err(now) => used = now,
            }
        }
    }

    pub fn contains(p: *mut c_void) -> bool {
        // One compare: below the base wraps around to far above the size.
        (p as usize).wrapping_sub(Self::base()) < ARENA_SIZE
    }

    /// The size a block of the arena was allocated with.
    pub fn size(p: *mut c_void) -> usize {
        // SAFETY: `p` is a block of the arena ([`Arena::contains`]): its size precedes it.
        unsafe { *((p as usize - 8) as *const usize) }
    }
}
