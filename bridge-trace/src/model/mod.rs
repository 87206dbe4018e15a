//! The plain data that crosses from the live half to the offline half: a process's memory
//! maps, a snapshot of what the kernel knew, the counters and a recording's metadata. No
//! behaviour beyond reading `/proc` and small derivations; both halves use it.
pub mod classify;
pub mod counters;
pub mod maps;
pub mod meta;
pub mod sites;
pub mod snapshot;
pub mod timeline;
