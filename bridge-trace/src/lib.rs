//! bridge-trace: find the memory a running process never frees, without restarting it.
//!
//! One `record` flows through the modules in this order:
//! [`cli`] turns arguments into a validated [`cli::Config`]; [`target`] finds (or launches) the
//! process and the allocator it maps; [`attach`] loads the eBPF object and attaches the probes
//! from one table, each entry probe where [`placement`] finds the kernel need not single-step; [`unwind`] feeds the kernel half's stack walker with each mapped object's
//! call-frame information, compiled into tables; [`collect`] is the only reader of the kernel maps and turns them into an owned
//! [`collect::Snapshot`]; [`symbolize`] names every frame with blazesym, from the memory maps it
//! kept while the process lived; [`aggregate`] groups live allocations by call stack into a
//! [`aggregate::Report`]; [`report`] renders it (svg, folded, json, text) and writes it
//! atomically. [`record`] drives that pipeline and decides when to stop.
pub mod error;

pub mod aggregate;
pub mod attach;
pub mod cli;
pub mod collect;
pub mod diff;
pub mod floor;
pub mod placement;
pub mod record;
pub mod report;
pub mod symbolize;
pub mod target;
pub mod unwind;
pub mod watch;

pub use error::Error;
