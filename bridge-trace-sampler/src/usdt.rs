//! The `otel_memory` USDT contract as this library emits it: the probe sites (a 5-byte nop
//! each, which Linux 6.18 optimizes into a call instead of a trap) with their
//! `.note.stapsdt` entries, and the semaphores a tracer raises while it is attached.
//!
//! | probe | arguments | fired |
//! |---|---|---|
//! | `otel_memory:alloc` | pointer, size, weight (bytes the sample stands for) | on a sampled allocation |
//! | `otel_memory:free` | pointer | on the release of a sampled block |

/// The semaphores, raised by the kernel (a uprobe's reference counter) while a tracer's probe
/// is attached: `alloc` is read before anything is sampled. In `.probes` as in `<sys/sdt.h>`,
/// and alone in a page of the file: the kernel finds a semaphore by its file offset in the
/// first writable mapping that covers it, and a page the linker shares between the RELRO
/// segment and the data segment is mapped twice (writable, briefly, at the RELRO address
/// too, while the loader maps the library: a tracer attached before the program started
/// would raise that copy instead).
#[repr(C, align(4096))]
struct Semaphores {
    alloc: u16,
    free: u16,
}

#[no_mangle]
#[used]
#[link_section = ".probes"]
static mut otel_memory_semaphores: Semaphores = Semaphores { alloc: 0, free: 0 };

/// Whether a tracer is attached to the `alloc` probe: one load.
#[inline(always)]
pub fn alloc_enabled() -> bool {
    // SAFETY: a read of a 2-byte global the kernel writes as a whole; volatile, since the
    // kernel changes it behind the compiler's back.
    unsafe { core::ptr::read_volatile(&raw const otel_memory_semaphores.alloc) != 0 }
}

/// One probe site: a 5-byte nop and its note, `args` being the SDT argument descriptors.
macro_rules! site {
    ($name:literal, $sem:literal, $args:literal, $($op:expr),*) => {
        // SAFETY: a nop; the note and base sections are data the program never reads.
        unsafe {
            core::arch::asm!(
                concat!(
                    // Spelled as bytes: an assembler shortens `nopl 0x0(%rax,%rax,1)` to
                    // four, which the kernel single-steps (~12 µs a hit, not ~0.7).
                    "990: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n",
                    ".pushsection .note.stapsdt,\"?\",\"note\"\n",
                    ".balign 4\n",
                    ".4byte 992f-991f, 994f-993f, 3\n",
                    "991: .asciz \"stapsdt\"\n",
                    "992: .balign 4\n",
                    "993: .8byte 990b\n",
                    ".8byte _.stapsdt.base\n",
                    ".8byte {sem}+", $sem, "\n",
                    ".asciz \"otel_memory\"\n",
                    ".asciz \"", $name, "\"\n",
                    ".asciz \"", $args, "\"\n",
                    "994: .balign 4\n",
                    ".popsection\n",
                    ".ifndef _.stapsdt.base\n",
                    ".pushsection .stapsdt.base,\"aGR\",\"progbits\",.stapsdt.base,comdat\n",
                    ".weak _.stapsdt.base\n",
                    ".hidden _.stapsdt.base\n",
                    "_.stapsdt.base: .space 1\n",
                    ".size _.stapsdt.base, 1\n",
                    ".popsection\n",
                    ".endif\n",
                ),
                $(in(reg) $op,)*
                sem = sym otel_memory_semaphores,
                options(att_syntax, readonly, nostack, preserves_flags),
            )
        }
    };
}

/// `otel_memory:alloc(ptr, size, weight)`.
#[inline(never)]
pub fn alloc(ptr: usize, size: usize, weight: u64) {
    site!("alloc", "0", "8@{0} 8@{1} 8@{2}", ptr, size, weight);
}

/// `otel_memory:free(ptr)`.
#[inline(never)]
pub fn free(ptr: usize) {
    site!("free", "2", "8@{0}", ptr);
}
