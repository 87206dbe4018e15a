//! Loaded into a running process (`bridge-trace --inject`: the tracer makes one of its
//! threads `dlopen` this library and call [`bridge_trace_sampler_attach`]) instead of
//! preloaded: nothing binds to this library's `malloc` then, so it redirects the malloc family
//! itself, in the global offset table of every object the process has loaded, as the
//! dynamic loader would have bound them had it been preloaded.
//!
//! The allocator underneath is the process's own ([`crate::real::resolve_global`]). Blocks
//! allocated before are not in the sample table, so they are freed, reallocated and measured
//! by the allocator as before. The library stays when the tracer leaves, idle: the semaphores
//! are zero again, and each call costs a load and a branch more.
use core::{
    ffi::{c_char, c_int, c_void, CStr},
    sync::atomic::{AtomicUsize, Ordering},
};

/// The functions redirected, by the names the GOT entries bind: each one this library's own.
const NAMES: [&CStr; 11] = [
    c"malloc",
    c"calloc",
    c"realloc",
    c"reallocarray",
    c"free",
    c"posix_memalign",
    c"aligned_alloc",
    c"memalign",
    c"valloc",
    c"pvalloc",
    c"malloc_usable_size",
];

const DT_NULL: i64 = 0;
const DT_PLTRELSZ: i64 = 2;
const DT_STRTAB: i64 = 5;
const DT_SYMTAB: i64 = 6;
const DT_RELA: i64 = 7;
const DT_RELASZ: i64 = 8;
const DT_JMPREL: i64 = 23;
const R_X86_64_GLOB_DAT: u32 = 6;
const R_X86_64_JUMP_SLOT: u32 = 7;
const PT_DYNAMIC: u32 = 2;
const PT_GNU_RELRO: u32 = 0x6474_e552;

#[repr(C)]
struct Dyn {
    tag: i64,
    val: u64,
}

#[repr(C)]
struct Rela {
    offset: u64,
    info: u64,
    _addend: i64,
}

#[repr(C)]
struct Sym {
    name: u32,
    _info: u8,
    _other: u8,
    _shndx: u16,
    _value: u64,
    _size: u64,
}

/// Why an attach did nothing.
#[repr(i64)]
enum Failure {
    /// The library was preloaded: the loader bound the process to it already.
    Preloaded = -1,
    /// This library's own definitions could not be found (`dlopen`/`dlsym` of itself).
    NoSelf = -2,
}

/// Redirects the malloc family of every loaded object to this library and samples every
/// `mean` bytes (1: every allocation) while a tracer holds the semaphore. Returns the GOT
/// entries rewritten (0 when they all were already), or a negative [`Failure`]. Called again
/// (a second injection, or objects loaded since), it only rewrites what is not yet redirected.
///
/// # Safety
/// Called once at a time, from a thread stopped outside the allocator and the dynamic loader
/// (the tracer's remote call), with the process's other threads stopped.
#[no_mangle]
pub unsafe extern "C" fn bridge_trace_sampler_attach(mean: u64) -> i64 {
    attach(mean)
}

fn attach(mean: u64) -> i64 {
    crate::real::resolve_global();
    if !crate::real::resolved() {
        // Being resolved through RTLD_NEXT: preloaded, in its first call.
        return Failure::Preloaded as i64;
    }
    let Some((own_base, own)) = own_functions() else {
        return Failure::NoSelf as i64;
    };
    // Preloaded, the process's `malloc` is this library's already.
    // SAFETY: a NUL-terminated name.
    let global = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as usize;
    if own.iter().any(|&(_, a)| a == global) {
        return Failure::Preloaded as i64;
    }
    crate::sample::set_mean(mean);
    let mut walk = Walk {
        own,
        own_base,
        rewritten: 0,
    };
    // SAFETY: the callback only reads the loader's own tables for each object.
    unsafe { libc::dl_iterate_phdr(Some(each_object), &mut walk as *mut Walk as *mut c_void) };
    walk.rewritten as i64
}

/// This library's load address and its definitions of [`NAMES`]: looked up in itself (its own
/// handle searches it first), where the process's global scope would find the allocator's.
fn own_functions() -> Option<(usize, [(&'static CStr, usize); NAMES.len()])> {
    // SAFETY: all-zero is a valid Dl_info.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: an address of this library and an out-parameter.
    let found = unsafe { libc::dladdr(attach as *const () as usize as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: the path the loader loaded this library from; NOLOAD finds it (and keeps it
    // loaded for good: a redirected GOT must never point into an unmapped library).
    let me = unsafe { libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if me.is_null() {
        return None;
    }
    let mut own = [(c"", 0usize); NAMES.len()];
    let base = info.dli_fbase as usize;
    for (slot, name) in own.iter_mut().zip(NAMES) {
        // SAFETY: a handle of this library and a NUL-terminated name.
        let at = unsafe { libc::dlsym(me, name.as_ptr()) } as usize;
        // A name this library does not define is found in its dependencies: not ours.
        *slot = (name, if base_of(at) == base { at } else { 0 });
    }
    Some((base, own))
}

/// The load address of the object holding `addr` (0 when none does).
fn base_of(addr: usize) -> usize {
    // SAFETY: all-zero is a valid Dl_info.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: any address and an out-parameter.
    match unsafe { libc::dladdr(addr as *const c_void, &mut info) } {
        0 => 0,
        _ => info.dli_fbase as usize,
    }
}

struct Walk {
    own: [(&'static CStr, usize); NAMES.len()],
    own_base: usize,
    rewritten: usize,
}

/// One loaded object: its GOT entries bound to a function of [`NAMES`] are pointed at this
/// library's. Not this library (its own entries reach the allocator), the dynamic loader (it
/// allocates through libc's pointers of its own) or the vDSO.
unsafe extern "C" fn each_object(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut c_void,
) -> c_int {
    // SAFETY: the loader's description of one object, and our `Walk`, for this call.
    let (info, walk) = unsafe { (&*info, &mut *(data as *mut Walk)) };
    let base = info.dlpi_addr as usize;
    let name = if info.dlpi_name.is_null() {
        &b""[..]
    } else {
        // SAFETY: the loader's NUL-terminated name of the object.
        unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
    };
    let skip = (base == walk.own_base && base != 0)
        || contains(name, b"/ld-linux")
        || name.starts_with(b"ld-linux")
        || name.starts_with(b"linux-vdso")
        || name.starts_with(b"linux-gate");
    if skip {
        return 0;
    }
    // SAFETY: the object's program headers, as many as the loader says.
    let phdrs = unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let Some(dynamic) = phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) else {
        return 0;
    };
    let relro = phdrs
        .iter()
        .find(|p| p.p_type == PT_GNU_RELRO)
        .map(|p| (base + p.p_vaddr as usize, p.p_memsz as usize));
    // SAFETY: the object's dynamic section, mapped while it is loaded.
    unsafe {
        rewrite(
            walk,
            base,
            (base + dynamic.p_vaddr as usize) as *const Dyn,
            relro,
        )
    };
    0
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Rewrites the entries of one object whose dynamic section is at `dynamic`.
///
/// # Safety
/// `dynamic` is a loaded object's dynamic section, `base` its load address.
unsafe fn rewrite(
    walk: &mut Walk,
    base: usize,
    dynamic: *const Dyn,
    relro: Option<(usize, usize)>,
) {
    let (mut strtab, mut symtab, mut rela, mut relasz, mut jmprel, mut pltrelsz) =
        (0, 0, 0, 0, 0, 0);
    let mut d = dynamic;
    loop {
        // SAFETY: the entries up to DT_NULL are the object's.
        let e = unsafe { &*d };
        match e.tag {
            DT_NULL => break,
            DT_STRTAB => strtab = e.val as usize,
            DT_SYMTAB => symtab = e.val as usize,
            DT_RELA => rela = e.val as usize,
            DT_RELASZ => relasz = e.val as usize,
            DT_JMPREL => jmprel = e.val as usize,
            DT_PLTRELSZ => pltrelsz = e.val as usize,
            _ => {}
        }
        // SAFETY: not past DT_NULL.
        d = unsafe { d.add(1) };
    }
    // glibc relocates the addresses of a dynamic section it may write (most objects); one it
    // may not (read-only) still holds link-time addresses, below the load address.
    let at = |a: usize| if a != 0 && a < base { a + base } else { a };
    let (strtab, symtab) = (at(strtab), at(symtab));
    if strtab == 0 || symtab == 0 {
        return;
    }
    for (table, bytes) in [(at(jmprel), pltrelsz), (at(rela), relasz)] {
        if table == 0 {
            continue;
        }
        let n = bytes / core::mem::size_of::<Rela>();
        // SAFETY: the object's relocation table, `bytes` long.
        let relocs = unsafe { core::slice::from_raw_parts(table as *const Rela, n) };
        for r in relocs {
            let kind = r.info as u32;
            if kind != R_X86_64_JUMP_SLOT && kind != R_X86_64_GLOB_DAT {
                continue;
            }
            // SAFETY: the symbol the relocation names, in the object's tables.
            let name = unsafe {
                let sym = &*((symtab as *const Sym).add((r.info >> 32) as usize));
                CStr::from_ptr((strtab + sym.name as usize) as *const c_char)
            };
            let Some(&(_, ours)) = walk.own.iter().find(|(n, a)| *n == name && *a != 0) else {
                continue;
            };
            let slot = base + r.offset as usize;
            // SAFETY: a GOT entry of the object, 8 bytes, aligned.
            let entry = unsafe { &*(slot as *const AtomicUsize) };
            if entry.load(Ordering::Relaxed) == ours {
                continue;
            }
            // SAFETY: as above; a RELRO page is made writable for the store and read-only again.
            unsafe {
                store(
                    entry,
                    ours,
                    relro.filter(|&(s, l)| slot >= s && slot < s + l),
                )
            };
            walk.rewritten += 1;
        }
    }
}

/// Stores `value` into the GOT entry, through a read-only page if it is one.
unsafe fn store(entry: &AtomicUsize, value: usize, relro: Option<(usize, usize)>) {
    let page = (entry as *const AtomicUsize as usize) & !4095;
    if relro.is_some() {
        // SAFETY: the page holding the entry, mapped.
        unsafe {
            libc::mprotect(
                page as *mut c_void,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
    }
    entry.store(value, Ordering::Release);
    if relro.is_some() {
        // SAFETY: as above; RELRO is read-only once the loader has relocated the object.
        unsafe { libc::mprotect(page as *mut c_void, 4096, libc::PROT_READ) };
    }
}
