//! bridge-trace: find the memory a running process never frees, without restarting it.
//!
//! One `record` flows through the modules in this order:
//! [`cli`] turns arguments into a validated [`cli::Config`]; [`target`] finds (or launches) the
//! process and the allocator it maps; [`attach`] loads the eBPF object and attaches the probes
//! from one table, each entry probe where [`placement`] finds the kernel need not single-step; [`unwind`] feeds the kernel half's stack walker with each mapped object's
//! call-frame information, compiled into tables; [`collect`] is the only reader of the kernel maps and turns them into an owned
//! [`collect::Snapshot`]; [`capture`] groups its live allocations by raw stack, each frame a
//! (module, file offset) from the memory maps kept while the process lived, and is written as
//! the raw capture (`.btcap`) that `bridge-trace report` renders again anywhere; [`symbolize`]
//! names every frame with blazesym; [`aggregate`] groups the named stacks into a
//! [`aggregate::Report`]; [`report`] renders it (svg, folded, json, text, pprof, html) and writes
//! it atomically. [`record`] drives that pipeline and decides when to stop.
pub mod error;

pub mod aggregate;
pub mod attach;
pub mod capture;
pub mod cli;
pub mod collect;
pub mod diff;
pub mod floor;
pub mod placement;
pub mod record;
pub mod report;
pub mod rerender;
pub mod symbolize;
pub mod target;
pub mod unwind;
pub mod watch;

pub use error::Error;
