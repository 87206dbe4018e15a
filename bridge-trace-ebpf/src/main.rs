//! The kernel half of bridge-trace: uprobes on the allocators' entry points that keep, in
//! kernel maps, every live allocation of the target processes (address → size, stack, time)
//! and running totals per call stack; and probes on what makes a heap grow, attributing that
//! growth to user stacks. One module per probe family; every map in [`maps`], with who
//! writes, reads and purges it.
//!
//! | module | programs |
//! |---|---|
//! | [`alloc`] | `malloc_enter` … `xallocx_enter` (one per argument layout), `alloc_return` |
//! | [`free`] | `free_enter` |
//! | [`stack`] | none: the stack walker the others call |
//! | [`growth`] | `brk_enter`, `mmap_enter`, `munmap_enter`, `mremap_enter`, `growth_return`, `page_fault_user` |
//! | [`process`] | `process_exec`, `new_task`, `child_fault`, `start_enter`, `exit_enter` |
//! | [`usdt`] | `usdt_alloc`, `usdt_free` (the `otel_memory` contract) |
//! | [`floor`] | `floor_enter`, `floor_return`, `floor_return_empty`, `floor_free` |
#![no_std]
#![no_main]

mod knobs;
mod maps;
mod helpers;
mod stack;
mod alloc;
mod free;
mod growth;
mod process;
mod usdt;
mod floor;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
