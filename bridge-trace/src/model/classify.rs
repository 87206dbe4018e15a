//! Tells leaks from caches and churn, per call site, from its outstanding memory window after
//! window (`watch`'s windows, and those `record` takes while it runs). A site is:
//! - **leaking** when, over the last [`LEAK_WINDOWS`] windows, its *old* allocations (older
//!   than two windows, past any request's lifetime) kept piling up — more of them early and
//!   late in the span, at least [`LEAK_WINDOWS`] more in all, fewer in at most one window —
//!   and its oldest allocation stayed, aging all along: nothing old is ever freed. "More" is
//!   counted in allocations seen, not in the estimates a sample stands for, and a window
//!   without a new one is no evidence against a leak: a sampled leak shows up in a window
//!   only when one of its allocations was sampled, at the default interval less than once a
//!   window for a slow one;
//! - **cache** when it holds old allocations but either their number stopped growing (a cache
//!   that filled, state kept for the process's life) or the oldest ones are being replaced (an
//!   LRU cache: its oldest allocation's age stops growing);
//! - **churn** when everything it holds is young (allocated and freed within a request).
//!
//! In the growth tier, where single allocations are not seen, a site's figure is the heap
//! growth attributed to it, and it is **growing** when that grew in (nearly) every one of the
//! last [`LEAK_WINDOWS`] windows, **steady** otherwise.
//!
//! Memory allocated before watching started is invisible, so a cache whose entries live longer
//! than the watch so far looks like a leak until its first entries are replaced; a cache that
//! is still filling is flagged only if it fills for longer than [`LEAK_WINDOWS`] windows.
use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use super::snapshot::{LiveAlloc, Snapshot};

/// Windows of growth of old memory that make a leak: with the two an allocation takes to grow
/// old, a leak is named [`LEAK_WINDOWS`] + 1 windows after watching starts (50 s at `watch`'s
/// default 10 s).
pub const LEAK_WINDOWS: usize = 4;
/// Windows of history kept per site.
pub const HISTORY: usize = 64;
/// Growth over the last [`LEAK_WINDOWS`] windows below which a growth-tier site is steady.
pub const GROWTH_MIN_BYTES: u64 = 64 * 1024;
/// An allocation is old once it has lived this many windows.
pub const OLD_AFTER_WINDOWS: f64 = 2.0;

/// Bytes, counts and ages per stack in one snapshot.
#[derive(Clone, Copy, Default)]
pub struct Held {
    pub bytes: f64,
    pub count: f64,
    pub old_bytes: f64,
    pub old_count: f64,
    /// Old allocations seen (samples, in a sampled tier), not estimated.
    pub old_seen: u64,
    pub oldest_ns: u64,
}

impl Held {
    /// Adds another stack's figures (of the same site) to these.
    pub fn add(&mut self, other: &Held) {
        self.bytes += other.bytes;
        self.count += other.count;
        self.old_bytes += other.old_bytes;
        self.old_count += other.old_count;
        self.old_seen += other.old_seen;
        self.oldest_ns = self.oldest_ns.max(other.oldest_ns);
    }

    /// The window these figures close at `at_secs`.
    pub fn window(&self, at_secs: f64) -> Window {
        Window {
            at_secs,
            bytes: self.bytes.round() as u64,
            count: self.count.round() as u64,
            old_bytes: self.old_bytes.round() as u64,
            old_seen: self.old_seen,
            oldest_age_secs: self.oldest_ns as f64 / 1e9,
        }
    }
}

/// The live allocations of `snap` grouped by `key` (of each allocation: by its stack id and
/// direct caller, say), those older than `old_ns` counted apart.
pub fn held_by_stack<K: std::hash::Hash + Eq>(
    snap: &Snapshot,
    old_ns: u64,
    key: impl Fn(&LiveAlloc) -> K,
) -> HashMap<K, Held> {
    let mut by_stack: HashMap<K, Held> = HashMap::new();
    for a in &snap.allocs {
        let h = by_stack.entry(key(a)).or_default();
        let age = snap.taken_ns.saturating_sub(a.ts_ns);
        let (bytes, count) = a.estimate();
        h.bytes += bytes;
        h.count += count;
        if age >= old_ns {
            h.old_bytes += bytes;
            h.old_count += count;
            h.old_seen += 1;
        }
        h.oldest_ns = h.oldest_ns.max(age);
    }
    by_stack
}

/// One site's live allocations at the end of one window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Window {
    /// Seconds since watching started.
    pub at_secs: f64,
    pub bytes: u64,
    pub count: u64,
    /// Bytes held by allocations older than [`OLD_AFTER_WINDOWS`] windows.
    pub old_bytes: u64,
    /// Old allocations seen (samples, in a sampled tier), not estimated: what tells a leak.
    pub old_seen: u64,
    pub oldest_age_secs: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Not enough history yet.
    Undecided,
    Leaking,
    Cache,
    Churn,
    /// Growth tier: the heap keeps growing from this site.
    Growing,
    /// Growth tier: no sustained growth from this site.
    Steady,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Undecided => "undecided",
            Class::Leaking => "leaking",
            Class::Cache => "cache",
            Class::Churn => "churn",
            Class::Growing => "growing",
            Class::Steady => "steady",
        }
    }

    pub fn from_name(name: &str) -> Option<Class> {
        [
            Class::Undecided,
            Class::Leaking,
            Class::Cache,
            Class::Churn,
            Class::Growing,
            Class::Steady,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }

    /// The more alarming of two classes (leaking, growing, cache, churn, steady, undecided).
    pub fn worst(self, other: Class) -> Class {
        let rank = |c: Class| match c {
            Class::Leaking => 5,
            Class::Growing => 4,
            Class::Cache => 3,
            Class::Churn => 2,
            Class::Steady => 1,
            Class::Undecided => 0,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// A site's recent windows.
#[derive(Clone, Debug, Default)]
pub struct Trend {
    windows: VecDeque<Window>,
}

impl Trend {
    pub fn push(&mut self, w: Window) {
        if self.windows.len() == HISTORY {
            self.windows.pop_front();
        }
        self.windows.push_back(w);
    }

    pub fn latest(&self) -> Window {
        self.windows.back().copied().unwrap_or_default()
    }

    pub fn class(&self) -> Class {
        let latest = self.latest();
        if self.windows.len() < LEAK_WINDOWS + 1 {
            if !self.windows.is_empty() && latest.old_bytes == 0 && self.windows.len() > 2 {
                return Class::Churn;
            }
            return Class::Undecided;
        }
        if latest.old_bytes == 0 {
            return Class::Churn;
        }
        // The span's windows, oldest first, and its steps from one to the next.
        let span: Vec<&Window> = self
            .windows
            .iter()
            .skip(self.windows.len() - LEAK_WINDOWS - 1)
            .collect();
        let (then, now) = (span[0], span[LEAK_WINDOWS]);
        let rose = |steps: &[&[&Window]]| steps.iter().any(|p| p[1].old_seen > p[0].old_seen);
        let steps: Vec<&[&Window]> = span.windows(2).collect();
        let (early, late) = steps.split_at(LEAK_WINDOWS / 2);
        let fell = steps
            .iter()
            .filter(|p| p[1].old_seen < p[0].old_seen)
            .count();
        let piling_up = rose(early)
            && rose(late)
            && fell <= 1
            && now.old_seen >= then.old_seen + LEAK_WINDOWS as u64;
        let secs = now.at_secs - then.at_secs;
        let oldest_stays = now.oldest_age_secs - then.oldest_age_secs >= 0.8 * secs;
        if piling_up && oldest_stays {
            Class::Leaking
        } else {
            Class::Cache
        }
    }

    /// The class of a growth-tier site, whose `bytes` are the growth attributed to it so far.
    pub fn growth_class(&self) -> Class {
        if self.windows.len() < LEAK_WINDOWS + 1 {
            return Class::Undecided;
        }
        let recent: Vec<&Window> = self.windows.iter().rev().take(LEAK_WINDOWS + 1).collect();
        let steps = recent
            .windows(2)
            .filter(|p| p[0].bytes > p[1].bytes)
            .count();
        // At least GROWTH_MIN_BYTES over the span: a stack or a thread arena touching a page
        // now and then is not a leak.
        let grown = recent[0].bytes >= recent[LEAK_WINDOWS].bytes + GROWTH_MIN_BYTES;
        if steps + 1 >= LEAK_WINDOWS && grown {
            Class::Growing
        } else {
            Class::Steady
        }
    }

    /// Growth of the site's memory in bytes per second over about the last `span_secs`.
    pub fn growth_rate(&self, span_secs: f64) -> f64 {
        let Some((first, last)) = self.span(span_secs) else {
            return 0.0;
        };
        let dt = last.at_secs - first.at_secs;
        if dt <= 0.0 {
            return 0.0;
        }
        (last.bytes as f64 - first.bytes as f64) / dt
    }

    /// How many seconds of the last `span_secs` the history covers: what a rate over "the
    /// last 5m" was measured over, after 25 s of watching.
    pub fn covered_secs(&self, span_secs: f64) -> f64 {
        self.span(span_secs)
            .map_or(0.0, |(first, last)| last.at_secs - first.at_secs)
    }

    /// The first and last windows within the last `span_secs`.
    fn span(&self, span_secs: f64) -> Option<(&Window, &Window)> {
        let last = self.windows.back()?;
        let first = self
            .windows
            .iter()
            .find(|w| last.at_secs - w.at_secs <= span_secs)
            .unwrap_or(last);
        Some((first, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows one second apart of (old allocations seen, age of the oldest), each seen one
    /// standing for `per` allocations of 100 bytes, with `young` more seen.
    fn site(series: &[(u64, f64)], per: u64, young: u64) -> Trend {
        let mut t = Trend::default();
        for (i, &(seen, oldest)) in series.iter().enumerate() {
            t.push(Window {
                at_secs: i as f64,
                bytes: (seen + young) * per * 100,
                count: (seen + young) * per,
                old_bytes: seen * per * 100,
                old_seen: seen,
                oldest_age_secs: oldest,
            });
        }
        t
    }

    /// Every allocation seen (tier full): (count of old allocations, age of the oldest).
    fn trend(series: &[(u64, f64)]) -> Trend {
        site(series, 1, 2)
    }

    /// A rate over "the last 5m" after 25 s of windows was measured over 25 s: the alert
    /// says so.
    #[test]
    fn a_rate_says_what_it_covered() {
        let t = trend(&(0..26).map(|i| (i, i as f64)).collect::<Vec<_>>());
        assert_eq!(t.covered_secs(300.0), 25.0);
        assert_eq!(t.covered_secs(10.0), 10.0);
        assert_eq!(t.growth_rate(300.0), 100.0);
        assert_eq!(Trend::default().covered_secs(300.0), 0.0);
    }

    #[test]
    fn leak_cache_churn() {
        // A leak: one allocation a window, never freed; the first stays and ages.
        let leak: Vec<(u64, f64)> = (0..10).map(|i| (i.max(2) - 2, i as f64)).collect();
        assert_eq!(trend(&leak).class(), Class::Leaking);
        assert!((trend(&leak).growth_rate(4.0) - 100.0).abs() < 1e-9);
        // A cache that filled in three windows and keeps its entries.
        let filled: Vec<(u64, f64)> = (0..10).map(|i: u64| (i.min(3), i as f64)).collect();
        assert_eq!(trend(&filled).class(), Class::Cache);
        // An LRU cache: as many old entries each window, the oldest replaced (its age bounded).
        let lru: Vec<(u64, f64)> = (0..10).map(|i| (i.min(4), (i as f64).min(4.5))).collect();
        assert_eq!(trend(&lru).class(), Class::Cache);
        // An LRU cache whose count of old entries wobbles upwards by chance: the oldest entry
        // is still replaced.
        let lucky = [
            (3, 4.2),
            (3, 4.4),
            (4, 4.1),
            (5, 4.3),
            (6, 4.4),
            (7, 4.2),
            (8, 4.5),
        ];
        assert_eq!(trend(&lucky).class(), Class::Cache);
        // Churn: nothing old.
        let churn: Vec<(u64, f64)> = (0..8).map(|i| (0, 0.1 * i as f64)).collect();
        assert_eq!(trend(&churn).class(), Class::Churn);
        // Too early to tell.
        assert_eq!(trend(&leak[..2]).class(), Class::Undecided);
    }

    /// A sampled site: each sample stands for 250 allocations.
    fn sampled(series: &[(u64, f64)]) -> Trend {
        site(series, 250, 1)
    }

    /// A sampled leak shows up only in the windows where one of its allocations was sampled:
    /// windows without a new one do not clear it; too few samples, or samples that came in one
    /// burst, or old ones freed again, do not make a leak.
    #[test]
    fn a_sparse_sampled_leak() {
        let ages = |seen: [u64; 5]| -> Vec<(u64, f64)> {
            seen.iter()
                .enumerate()
                .map(|(i, &n)| (n, i as f64 + 0.5))
                .collect()
        };
        assert_eq!(sampled(&ages([0, 1, 1, 1, 5])).class(), Class::Leaking);
        assert_eq!(sampled(&ages([0, 2, 2, 4, 4])).class(), Class::Leaking);
        // Two samples: growth, but too little seen to tell (their estimates are big).
        assert_eq!(sampled(&ages([0, 1, 1, 2, 2])).class(), Class::Cache);
        // A burst that filled early, and one late.
        assert_eq!(sampled(&ages([0, 4, 8, 8, 8])).class(), Class::Cache);
        assert_eq!(sampled(&ages([0, 0, 0, 0, 8])).class(), Class::Cache);
        // Old samples freed twice.
        assert_eq!(sampled(&ages([0, 3, 2, 6, 5])).class(), Class::Cache);
        // The same growth with the oldest replaced (an LRU cache).
        let lru: Vec<(u64, f64)> = [0, 1, 1, 1, 5].iter().map(|&n| (n, 1.5)).collect();
        assert_eq!(sampled(&lru).class(), Class::Cache);
    }

    #[test]
    fn growth() {
        let series = |bytes: &[u64]| {
            let mut t = Trend::default();
            for (i, &b) in bytes.iter().enumerate() {
                t.push(Window {
                    at_secs: i as f64,
                    bytes: b,
                    ..Window::default()
                });
            }
            t
        };
        let pages = |n: &[u64]| n.iter().map(|p| p * 4096).collect::<Vec<_>>();
        assert_eq!(
            series(&pages(&[0, 4, 8, 12, 16, 20, 24])).growth_class(),
            Class::Growing
        );
        // One quiet window among five is still growth.
        assert_eq!(
            series(&pages(&[0, 4, 8, 8, 12, 16, 26])).growth_class(),
            Class::Growing
        );
        // A page now and then is not growth.
        assert_eq!(
            series(&pages(&[0, 1, 2, 3, 4, 5, 6])).growth_class(),
            Class::Steady
        );
        // A cache that filled, then nothing.
        assert_eq!(
            series(&pages(&[0, 30, 60, 61, 61, 61, 61])).growth_class(),
            Class::Steady
        );
        assert_eq!(series(&pages(&[0, 1, 2])).growth_class(), Class::Undecided);
    }
}
