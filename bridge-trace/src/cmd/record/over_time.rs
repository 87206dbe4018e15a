//! What `record` keeps while it runs, besides the maps: a timeline tick (the kernel's
//! per-stack totals and the resident set) at a fixed cadence, and a classification window
//! (every live allocation, as `watch` reads them) at a coarser one, so that the report says
//! when memory grew, what was held at the peak, and which call sites leak, cache or churn (a
//! site: the allocations' direct caller, whatever the stack above it, as `watch` sums a
//! site's stacks).
use std::{collections::HashMap, time::Duration};

use crate::{
    attach::Tracer,
    collect,
    model::{
        classify::{held_by_stack, Class, Trend, LEAK_WINDOWS, OLD_AFTER_WINDOWS},
        snapshot::{LiveAlloc, Snapshot},
        timeline::{Recorder, Timeline},
    },
    target,
};

/// Ticks per known duration: the cadence is the duration over this, within the bounds below.
const TICKS_PER_RUN: u32 = 240;
const MIN_TICK: Duration = Duration::from_millis(100);
const MAX_TICK: Duration = Duration::from_secs(10);
/// The cadence until the recording ends by itself (the points thin out as they fill up).
const OPEN_TICK: Duration = Duration::from_millis(250);
/// The first classification window of a recording that ends by itself: a short program gets
/// windows enough to be told apart; the windows double every [`OPEN_WINDOWS`] windows up to
/// [`MAX_WINDOW`] (`watch`'s default).
const OPEN_WINDOW: Duration = Duration::from_millis(500);
const OPEN_WINDOWS: u32 = 2 * (LEAK_WINDOWS as u32 + 1);
const MAX_WINDOW: Duration = Duration::from_secs(10);
const MIN_WINDOW: Duration = Duration::from_millis(500);

pub(super) struct OverTime {
    pub(super) tick_every: Duration,
    pub(super) window_every: Duration,
    recorder: Recorder,
    /// By call site (the address of the allocation's direct caller).
    trends: HashMap<u64, Trend>,
    /// Code whose frames are not a call site (an interposing sampler's).
    skip: Vec<(u64, u64)>,
    failed_ticks: u64,
    /// The windows double (the recording's end is not known).
    open: bool,
    windows: u32,
    last_window_secs: f64,
}

impl OverTime {
    /// The cadences for a recording of `duration` (or until it ends): a known duration gets
    /// [`TICKS_PER_RUN`] ticks and `LEAK_WINDOWS + 1` windows, enough to tell a leak at its end.
    pub(super) fn new(duration: Option<Duration>, skip: Vec<(u64, u64)>) -> OverTime {
        let open = duration.is_none();
        let (tick_every, window_every) = match duration {
            Some(d) => (
                (d / TICKS_PER_RUN).clamp(MIN_TICK, MAX_TICK),
                (d / (LEAK_WINDOWS as u32 + 1)).max(MIN_WINDOW),
            ),
            None => (OPEN_TICK, OPEN_WINDOW),
        };
        OverTime {
            tick_every,
            window_every,
            recorder: Recorder::new(tick_every.as_secs_f64()),
            trends: HashMap::new(),
            skip,
            failed_ticks: 0,
            open,
            windows: 0,
            last_window_secs: 0.0,
        }
    }

    /// One timeline tick of `pid`, `at_secs` into the recording.
    pub(super) fn tick(&mut self, tracer: &Tracer, pid: u32, at_secs: f64) {
        match collect::held_by_stack(tracer, pid) {
            Ok(held) => self.recorder.tick(at_secs, target::rss_bytes(pid), held),
            Err(e) => {
                self.failed_ticks += 1;
                tracing::debug!(%e, "timeline tick");
            }
        }
    }

    /// One classification window closing at `at_secs` with `snapshot` (a full read of the
    /// live allocations). Returns the new cadence when the windows double.
    pub(super) fn window(&mut self, snapshot: &Snapshot, at_secs: f64) -> Option<Duration> {
        self.windows += 1;
        self.last_window_secs = at_secs;
        let old_ns = (self.window_every.as_secs_f64() * OLD_AFTER_WINDOWS * 1e9) as u64;
        let held = held_by_stack(snapshot, old_ns, |a| snapshot.site_addr(a, &self.skip));
        for (key, trend) in &mut self.trends {
            if !held.contains_key(key) {
                // Everything it held was freed.
                trend.push(crate::model::classify::Held::default().window(at_secs));
            }
        }
        for (key, h) in held {
            self.trends.entry(key).or_default().push(h.window(at_secs));
        }
        if self.open && self.windows.is_multiple_of(OPEN_WINDOWS) && self.window_every < MAX_WINDOW
        {
            self.window_every = (self.window_every * 2).min(MAX_WINDOW);
            return Some(self.window_every);
        }
        None
    }

    pub(super) fn event(&mut self, at_secs: f64, what: impl Into<String>) {
        self.recorder.event(at_secs, what);
    }

    /// The timeline, and the class of each call site still holding memory, the last window
    /// closing on `snapshot` at `at_secs`.
    pub(super) fn finish(mut self, snapshot: &Snapshot, at_secs: f64) -> (Timeline, Classes) {
        // The last window, unless one closed just now.
        if at_secs - self.last_window_secs >= self.window_every.as_secs_f64() / 2.0 {
            self.window(snapshot, at_secs);
        }
        if self.failed_ticks > 0 {
            tracing::debug!(failed = self.failed_ticks, "timeline ticks not read");
        }
        let by_site = self
            .trends
            .iter()
            .filter(|(_, t)| t.latest().bytes > 0)
            .map(|(k, t)| (*k, t.class()))
            .collect();
        let classes = Classes {
            by_site,
            skip: self.skip,
        };
        (self.recorder.timeline(), classes)
    }
}

/// The class of each call site, and how an allocation's site is found.
pub(super) struct Classes {
    by_site: HashMap<u64, Class>,
    skip: Vec<(u64, u64)>,
}

impl Classes {
    /// The class of `a`'s call site in `snapshot`, if it was told.
    pub(super) fn of(&self, snapshot: &Snapshot, a: &LiveAlloc) -> Option<Class> {
        self.by_site
            .get(&snapshot.site_addr(a, &self.skip))
            .copied()
    }
}
