//! The recording over time, as the live half sees it: at a fixed cadence, the process's
//! resident memory and what each stack holds (the kernel's per-stack totals, allocated less
//! freed), kept at a bounded number of points (the cadence doubles when they fill up); the
//! highest total seen, at every tick, with what each stack held at that moment; and the events
//! worth marking on the chart. The capture turns it into frames ([`crate::capture`]).
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Points kept: when they fill up, every other one is dropped and the cadence doubles.
pub const MAX_POINTS: usize = 240;
/// Stacks drawn one by one; the rest of the total is drawn as one band.
pub const SERIES: usize = 8;

/// What one stack (`stack_id`, `ret_addr` as the kernel keys it) held at one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StackHeld {
    pub stack_id: u64,
    pub ret_addr: u64,
    pub bytes: f64,
    pub count: f64,
}

/// Something that happened while recording, marked on the chart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_secs: f64,
    pub what: String,
}

/// One kept point: totals over every stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since tracing started.
    pub at_secs: f64,
    /// The process's resident set (`/proc/PID/statm`), when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// What the traced allocations held: exact, or estimates from the samples' weights.
    pub bytes: f64,
    pub count: f64,
}

/// The highest total seen and what each stack held then.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeakTick {
    pub at_secs: f64,
    pub bytes: f64,
    pub count: f64,
    pub held: Vec<StackHeld>,
}

/// A finished timeline, stacks still as the kernel keys them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// The cadence of the kept points, and of the peak's search (the base cadence).
    pub every_secs: f64,
    pub peak_every_secs: f64,
    pub points: Vec<Point>,
    /// The stacks that held the most at any point, each with its bytes at every point.
    pub series: Vec<((u64, u64), Vec<f64>)>,
    pub peak: Option<PeakTick>,
    pub events: Vec<Event>,
}

/// A kept point with its tick number and what each stack (by index) held then.
type Kept = (u64, Point, Vec<(u32, f32)>);

/// Collects the ticks of one recording.
#[derive(Debug)]
pub struct Recorder {
    base_secs: f64,
    /// Every `stride`-th tick is kept.
    stride: u64,
    ticks: u64,
    keys: Vec<(u64, u64)>,
    index: HashMap<(u64, u64), u32>,
    points: Vec<Kept>,
    peak: Option<PeakTick>,
    events: Vec<Event>,
}

impl Recorder {
    /// A recorder ticked every `base_secs` seconds.
    pub fn new(base_secs: f64) -> Recorder {
        Recorder {
            base_secs,
            stride: 1,
            ticks: 0,
            keys: Vec::new(),
            index: HashMap::new(),
            points: Vec::new(),
            peak: None,
            events: Vec::new(),
        }
    }

    /// One tick: what every stack holds now and the process's resident set.
    pub fn tick(&mut self, at_secs: f64, rss_bytes: Option<u64>, held: Vec<StackHeld>) {
        let held: Vec<StackHeld> = held.into_iter().filter(|h| h.bytes > 0.0).collect();
        let bytes = held.iter().map(|h| h.bytes).sum::<f64>();
        let count = held.iter().map(|h| h.count).sum::<f64>();
        let point = Point {
            at_secs,
            rss_bytes,
            bytes,
            count,
        };
        let n = self.ticks;
        self.ticks += 1;
        if n.is_multiple_of(self.stride) {
            let mut by_index = Vec::with_capacity(held.len());
            for h in &held {
                let key = (h.stack_id, h.ret_addr);
                let i = *self.index.entry(key).or_insert_with(|| {
                    self.keys.push(key);
                    self.keys.len() as u32 - 1
                });
                by_index.push((i, h.bytes as f32));
            }
            self.points.push((n, point, by_index));
            if self.points.len() >= MAX_POINTS {
                let stride = self.stride * 2;
                self.points.retain(|(n, ..)| n.is_multiple_of(stride));
                self.stride = stride;
            }
        }
        if self.peak.as_ref().is_none_or(|p| bytes > p.bytes) {
            self.peak = Some(PeakTick {
                at_secs,
                bytes,
                count,
                held,
            });
        }
    }

    /// Marks `what` at `at_secs`.
    pub fn event(&mut self, at_secs: f64, what: impl Into<String>) {
        self.events.push(Event {
            at_secs,
            what: what.into(),
        });
    }

    /// The timeline so far: its points, the [`SERIES`] stacks that held the most at any
    /// point, the peak.
    pub fn timeline(&self) -> Timeline {
        let mut most = vec![0f32; self.keys.len()];
        for (_, _, held) in &self.points {
            for &(i, b) in held {
                most[i as usize] = most[i as usize].max(b);
            }
        }
        let mut order: Vec<u32> = (0..self.keys.len() as u32).collect();
        order.sort_by(|a, b| {
            most[*b as usize]
                .total_cmp(&most[*a as usize])
                .then(a.cmp(b))
        });
        order.truncate(SERIES);
        let series = order
            .iter()
            .map(|&i| {
                let values = self
                    .points
                    .iter()
                    .map(|(_, _, held)| {
                        held.iter()
                            .find(|(j, _)| *j == i)
                            .map_or(0.0, |(_, b)| *b as f64)
                    })
                    .collect();
                (self.keys[i as usize], values)
            })
            .collect();
        Timeline {
            every_secs: self.base_secs * self.stride as f64,
            peak_every_secs: self.base_secs,
            points: self.points.iter().map(|(_, p, _)| *p).collect(),
            series,
            peak: self.peak.clone(),
            events: self.events.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(stack_id: u64, bytes: f64) -> StackHeld {
        StackHeld {
            stack_id,
            ret_addr: stack_id,
            bytes,
            count: 1.0,
        }
    }

    #[test]
    fn keeps_the_peak_at_every_tick_and_halves_the_points() {
        let mut r = Recorder::new(0.5);
        for t in 0..(MAX_POINTS as u64 * 2) {
            // Stack 1 grows, stack 2 peaks at tick 100 (at 400 bytes) and is freed after.
            let two = if t <= 100 { 4.0 * t as f64 } else { 0.0 };
            r.tick(
                t as f64 * 0.5,
                Some(1000),
                vec![held(1, t as f64), held(2, two)],
            );
        }
        let tl = r.timeline();
        assert!(tl.points.len() < MAX_POINTS && tl.points.len() >= MAX_POINTS / 2);
        // Full at tick 240 (every other one dropped) and again at tick 478.
        assert_eq!(tl.every_secs, 2.0, "the cadence doubled twice");
        assert_eq!(tl.peak_every_secs, 0.5);
        // The highest total: stack 1's t plus stack 2's 4t, at t = 100 (500 bytes).
        let peak = tl.peak.unwrap();
        assert_eq!((peak.at_secs, peak.bytes), (50.0, 500.0));
        assert_eq!(peak.held.len(), 2);
        assert_eq!(tl.series.len(), 2);
        // Stack 1 reaches 479 bytes, stack 2 400: most first.
        assert_eq!(tl.series[0].0, (1, 1), "the stack that held the most first");
        let last = tl.points.len() - 1;
        assert_eq!(tl.series[0].1[last], tl.points[last].bytes);
        assert_eq!(tl.series[1].1[last], 0.0);
    }

    #[test]
    fn an_empty_tick_is_a_point_of_zero() {
        let mut r = Recorder::new(1.0);
        r.tick(0.0, None, vec![held(1, 0.0)]);
        r.event(0.5, "exec");
        let tl = r.timeline();
        assert_eq!(tl.points, [Point::default()]);
        assert!(tl.series.is_empty());
        assert_eq!(tl.events.len(), 1);
    }
}
