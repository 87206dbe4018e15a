//! bridge-trace: find the memory a running process never frees, without restarting it.
//!
//! The modules are declared in pipeline order, and an import only ever points to a module
//! declared above it (`tests/layering.rs` checks it):
//!
//! - **Leaves**, used everywhere: [`error`], [`units`] (durations, sizes, rates and their
//!   parsers), [`os`] (clocks, pidfds, signals, sudo), [`output`] (checked, atomic file
//!   output), and [`model`], the plain data both halves share.
//! - **The live half**, which needs root and a process: [`target`] finds (or launches) the
//!   process and the allocators it maps; [`attach`] loads the eBPF object and attaches the
//!   probes from one table, each where [`attach::placement`] finds the kernel need not
//!   single-step; [`unwind`] feeds the kernel's stack walker with each object's call-frame
//!   information; [`collect`] is the only reader of the kernel maps and turns them into a
//!   [`model::snapshot::Snapshot`].
//! - **The offline half**, which needs neither: [`capture`] groups a snapshot's allocations by
//!   raw stack, each frame a (module, file offset), and is the `.btcap` file; [`symbolize`]
//!   names the frames; [`aggregate`] groups the named stacks into a [`aggregate::Report`];
//!   [`render`] draws it in each format.
//! - **The commands** ([`cmd`]): `record`, `watch`/`top`, `report`, `diff` and the hidden
//!   `floor`, each driving the pipeline; none imports another.
//! - **The command line** ([`cli`]) turns arguments into a command's validated config; nothing
//!   imports it but `main.rs`.
pub mod error;
pub mod units;
pub mod os;
pub mod output;
pub mod model;

pub mod target;
pub mod attach;
pub mod unwind;
pub mod collect;

pub mod capture;
pub mod symbolize;
pub mod aggregate;
pub mod render;

pub mod cmd;

pub mod cli;

pub use error::Error;
