//! A validated `watch` (or `top`) request.
use std::{path::PathBuf, time::Duration};

use super::Tier;
use crate::{model::sites::Wrappers, unwind::Unwind};

/// A validated `watch` request.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub target: WatchTarget,
    pub interval: Duration,
    pub duration: Option<Duration>,
    /// None: no metrics served (`top`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `top`: rows of the live view printed every window.
    pub view_rows: Option<usize>,
    /// Bytes per second.
    pub alert_growth: Option<f64>,
    pub alert_window: Duration,
    pub on_alert: Option<String>,
    pub out_dir: Option<PathBuf>,
    pub snapshot_every: Duration,
    pub keep: usize,
    pub keep_size: u64,
    /// Permissions of the files written to `out_dir`.
    pub mode: u32,
    pub tier: Tier,
    /// Mean bytes between sampled allocations (sampled tier).
    pub sample_interval: u64,
    /// Overhead budget in CPUs (0.01 = 1 % of one CPU); None: no budget.
    pub max_overhead: Option<f64>,
    /// Never change tier.
    pub fixed_tier: bool,
    /// Trace a process that carries the `otel_memory` contract through it (tier usdt).
    pub usdt: bool,
    /// Load the sampler into each process first (`--inject`), at `sample_interval`.
    pub inject: bool,
    /// Live samples kept per process at tier usdt.
    pub max_samples: u64,
    /// Pyroscope-compatible base URL snapshots are pushed to.
    pub push: Option<String>,
    /// OTLP/HTTP endpoint each snapshot is exported to as a profile.
    pub otlp: Option<String>,
    /// Capacity of the kernel's live-allocation map.
    pub max_allocs: u32,
    pub unwind: Unwind,
    /// Allocation wrappers a site is named past (`--wrapper`, and the well-known ones).
    pub wrappers: Wrappers,
}

/// What `watch` follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchTarget {
    Pid(u32),
    /// The process running this executable (canonical path), and its successors.
    Exe(PathBuf),
    /// Every process of a cgroup v2 directory and its descendants, those started later too.
    Cgroup(PathBuf),
    /// A program `watch` starts (`-- CMD`), with the sampler preloaded (`--sampler`) or not.
    Launch {
        argv: Vec<std::ffi::OsString>,
        sampler: bool,
    },
}
