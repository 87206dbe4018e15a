//! The commands, each driving the pipeline its own way. A command never imports another: what
//! two of them share lives in the stages or the leaves below them.
pub mod diff;
pub mod floor;
pub mod record;
pub mod report;
pub mod sampler;
pub mod watch;
