//! Groups live allocations by their symbolized call stack into a [`Report`]: bytes, counts and
//! the oldest age per stack, after the `--min-age` filter, largest first; the timeline, the
//! peak and the allocation profile beside them; suppressions and the runtime's one-time
//! allocations ([`suppress`]).
pub mod suppress;

use std::{collections::HashMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    capture::{add_lifetimes, Capture, CapturedTimeline},
    model::{
        classify::Class,
        meta::{Meta, Process, USDT_TIER},
        sites::Wrappers,
        timeline::{Event, Point},
    },
    symbolize::{symbolize_locations, Blazesym, Debuginfod, Frame, Symbolize},
    units::human_bytes,
};

/// One call stack holding memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StackReport {
    pub bytes: u64,
    pub count: u64,
    pub oldest_age_secs: f64,
    /// Root first, the allocation's direct caller last.
    pub frames: Vec<Frame>,
    /// The stack was deeper than the kernel walk's limit; the root side is missing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Only the direct caller is known (the stack could not be stored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// The allocation wrappers between the site (the last of `frames`) and the allocator,
    /// outermost first ([`crate::model::sites`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wrappers: Vec<Frame>,
    /// In the allocation profile: the recorded frees by how long their blocks lived
    /// ([`bridge_trace_common::LIFETIME_BOUNDS_NS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetimes: Option<Vec<u64>>,
    /// Among what is held: `leaking`, `cache`, `churn` or `undecided`, as `watch` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// A one-time allocation of the runtime, and what it is ([`suppress::runtime_allocation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

/// The recording over time, named.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineReport {
    pub every_secs: f64,
    pub peak_every_secs: f64,
    pub points: Vec<Point>,
    /// The stacks that held the most at any point, labelled by their call site.
    pub series: Vec<SeriesReport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<PeakReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesReport {
    /// The call site (the stack's last frame that is not an allocation wrapper).
    pub site: String,
    pub frames: Vec<Frame>,
    pub bytes: Vec<f64>,
}

/// The highest total held and the stacks that held it then.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeakReport {
    pub at_secs: f64,
    pub bytes: u64,
    pub count: u64,
    pub stacks: Vec<StackReport>,
}

impl StackReport {
    /// The call site: the first frame above the allocator that is not a wrapper.
    pub fn site(&self) -> Option<&Frame> {
        self.frames.last()
    }
}

/// The report every renderer draws.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub meta: Meta,
    /// What is held, largest first.
    pub stacks: Vec<StackReport>,
    /// The allocation profile: what each stack allocated while traced, freed or not (no
    /// ages), most bytes first; `None` when the capture predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Vec<StackReport>>,
    /// What was held over time and at its peak; `None` when the capture predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<TimelineReport>,
    /// What each suppression rule took out of `stacks` (`--suppress`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suppressed: Vec<suppress::Suppressed>,
}

/// Which of a report's profiles a flamegraph or folded file shows (`--view`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum View {
    /// What is still held (pprof's `inuse_space`): the leaks.
    #[default]
    Inuse,
    /// What was allocated while traced, freed or not (pprof's `alloc_space`): the churn.
    Alloc,
    /// What was held at the highest total the timeline saw.
    Peak,
}

impl Report {
    pub fn total_bytes(&self) -> u64 {
        self.stacks.iter().map(|s| s.bytes).sum()
    }

    pub fn total_count(&self) -> u64 {
        self.stacks.iter().map(|s| s.count).sum()
    }

    /// The report as `view` shows it: its allocation profile in place of what is held, or an
    /// error saying why there is none.
    pub fn view(self, view: View) -> Result<Report, String> {
        match view {
            View::Inuse => Ok(self),
            View::Alloc => match self.allocated {
                Some(allocated) => Ok(Report {
                    stacks: allocated,
                    allocated: None,
                    ..self
                }),
                None => Err(
                    "this capture has no allocation profile (written before capture format \
                     version 3): only --view inuse"
                        .into(),
                ),
            },
            View::Peak => match self.timeline.as_ref().and_then(|t| t.peak.clone()) {
                Some(peak) => Ok(Report {
                    stacks: peak.stacks,
                    allocated: None,
                    ..self
                }),
                None => Err(
                    "this capture has no peak (a timeline is written from capture format \
                     version 4 on): --view inuse or alloc"
                        .into(),
                ),
            },
        }
    }

    /// Lines that say what the numbers miss; empty when nothing was lost.
    pub fn caveats(&self) -> Vec<String> {
        let c = &self.meta.counters;
        let mut out: Vec<String> = self.meta.verdicts.clone();
        out.extend(c.caveats());
        if self.meta.tier.as_deref() == Some(USDT_TIER) && self.meta.injected == Some(1) {
            out.push(format!(
                "bridge-trace's sampler was injected into the process and reported every \
                 allocation ({} of them), each with its own size: the figures are exact",
                c.usdt_allocs
            ));
        } else if self.meta.tier.as_deref() == Some(USDT_TIER) {
            out.push(format!(
                "allocations were sampled by the process itself (the otel_memory contract: {} \
                 samples reported): bytes and counts are unbiased estimates from their weights, \
                 not exact",
                c.usdt_allocs
            ));
        }
        if let Some(interval) = self.meta.sample_interval {
            out.push(format!(
                "allocations were sampled (one per {} allocated, on average; {} calls passed \
                 unrecorded): bytes and counts are unbiased estimates, not exact",
                human_bytes(interval),
                c.unsampled
            ));
        }
        if let Some(u) = &self.meta.unwind {
            for (object, reason) in &u.missing {
                out.push(format!("no unwind table for {object}: {reason}"));
            }
        }
        for s in &self.suppressed {
            out.push(format!(
                "suppressed by {} (from {}): {} bytes ({}) in {} allocations from {} stacks, \
                 not in the stacks above",
                s.rule,
                s.source,
                s.bytes,
                human_bytes(s.bytes),
                s.count,
                s.stacks
            ));
        }
        let runtime: Vec<&StackReport> =
            self.stacks.iter().filter(|s| s.runtime.is_some()).collect();
        if !runtime.is_empty() {
            out.push(format!(
                "{} bytes in {} stacks are one-time allocations of the runtime (marked \
                 \"runtime\"), not leaks of the program",
                runtime.iter().map(|s| s.bytes).sum::<u64>(),
                runtime.len()
            ));
        }
        out
    }
}

/// What `report` produced.
pub struct Rendered {
    pub report: Report,
    /// Modules whose frames stayed unnamed: (module, frames, why).
    pub unnamed: Vec<(String, usize, String)>,
    /// Modules whose debug file debuginfod did not give: (module, why).
    pub not_fetched: Vec<(String, String)>,
}

/// The report of a capture, named from this machine's files and `debug_dirs`, and from the
/// debug files `debuginfod` fetches.
pub fn report_of(
    capture: &Capture,
    debug_dirs: &[PathBuf],
    debuginfod: Option<Debuginfod>,
) -> Rendered {
    let mut symbolizer = Blazesym::local(debug_dirs).with_debuginfod(debuginfod);
    let report = aggregate(capture, &mut symbolizer);
    Rendered {
        report,
        unnamed: symbolizer.unnamed(),
        not_fetched: symbolizer.not_fetched(),
    }
}

/// Builds the report from a capture: names every location once, then groups the stacks that
/// name the same frames.
pub fn aggregate(capture: &Capture, symbolizer: &mut dyn Symbolize) -> Report {
    let names = symbolize_locations(
        symbolizer,
        &capture.modules,
        capture
            .stacks
            .iter()
            .chain(capture.allocated.iter().flatten())
            .chain(capture.timeline.iter().flat_map(CapturedTimeline::stacks))
            .flat_map(|s| s.frames.iter().copied()),
    );
    let named_stacks: Vec<Vec<Frame>> = capture
        .stacks
        .iter()
        .map(|s| named_frames(capture, s, &names))
        .collect();
    let mut wrappers = capture.meta.wrappers.clone();
    let innermost_first: Vec<Vec<Option<&str>>> = named_stacks
        .iter()
        .map(|frames| frames.iter().rev().map(|f| f.function.as_deref()).collect())
        .collect();
    wrappers.detect(&innermost_first);
    let mut stacks = group(&capture.stacks, named_stacks, &wrappers);
    for s in &mut stacks {
        s.runtime = suppress::runtime_allocation(s).map(str::to_string);
    }
    let allocated = capture.allocated.as_ref().map(|allocated| {
        let named = allocated
            .iter()
            .map(|s| named_frames(capture, s, &names))
            .collect();
        group(allocated, named, &wrappers)
    });
    let timeline = capture.timeline.as_ref().map(|t| {
        let series = t
            .series
            .iter()
            .map(|s| {
                let mut frames = named_frames(capture, &s.stack, &names);
                let run = wrappers.run(frames.iter().rev().map(|f| f.function.as_deref()));
                frames.truncate(frames.len() - run);
                SeriesReport {
                    site: frames
                        .last()
                        .map_or_else(|| "[unknown]".into(), Frame::short_label),
                    frames,
                    bytes: s.bytes.clone(),
                }
            })
            .collect();
        let peak = t.peak.as_ref().map(|p| {
            let named = p
                .stacks
                .iter()
                .map(|s| named_frames(capture, s, &names))
                .collect();
            PeakReport {
                at_secs: p.at_secs,
                bytes: p.bytes.round() as u64,
                count: p.count.round() as u64,
                stacks: group(&p.stacks, named, &wrappers),
            }
        });
        TimelineReport {
            every_secs: t.every_secs,
            peak_every_secs: t.peak_every_secs,
            points: t.points.clone(),
            series,
            events: t.events.clone(),
            peak,
        }
    });
    let mut meta = capture.meta.clone();
    meta.wrappers = wrappers;
    meta.modules = capture.modules.clone();
    meta.processes = capture
        .processes
        .iter()
        // A report names the processes; their mappings stay in the capture.
        .map(|p| Process {
            mappings: Vec::new(),
            ..p.clone()
        })
        .collect();
    Report {
        meta,
        stacks,
        allocated,
        timeline,
        suppressed: Vec::new(),
    }
}

/// Groups `captured` stacks (named as `named`) that show the same frames once the allocation
/// wrappers are cut off, largest first.
fn group(
    captured: &[crate::capture::CapturedStack],
    named_stacks: Vec<Vec<Frame>>,
    wrappers: &Wrappers,
) -> Vec<StackReport> {
    // Estimates are summed unrounded (sampled allocations stand for fractions of several).
    // Stacks that show the same frames are one stack, whatever return addresses they came
    // from (two calls on one source line, two wrappers on the way to the allocator).
    let mut groups: HashMap<Vec<FrameKey>, (StackReport, f64, f64)> = HashMap::new();
    for (s, mut named) in captured.iter().zip(named_stacks) {
        let run = wrappers.run(named.iter().rev().map(|f| f.function.as_deref()));
        let wrapped = named.split_off(named.len() - run);
        let key: Vec<FrameKey> = named.iter().map(FrameKey::of).collect();
        let (entry, bytes, count) = groups.entry(key).or_insert_with(|| {
            let r = StackReport {
                frames: named,
                truncated: s.truncated,
                partial: s.partial,
                wrappers: wrapped,
                ..StackReport::default()
            };
            (r, 0.0, 0.0)
        });
        *bytes += s.bytes;
        *count += s.count;
        entry.oldest_age_secs = entry.oldest_age_secs.max(s.oldest_age_secs);
        if let Some(l) = &s.lifetimes {
            add_lifetimes(&mut entry.lifetimes, l);
        }
        if let Some(c) = s.class.as_deref().and_then(Class::from_name) {
            let was = entry.class.as_deref().and_then(Class::from_name);
            entry.class = Some(was.map_or(c, |w| w.worst(c)).name().into());
        }
    }
    let mut stacks: Vec<StackReport> = groups
        .into_values()
        .map(|(mut r, bytes, count)| {
            r.bytes = bytes.round() as u64;
            r.count = count.round() as u64;
            r
        })
        .collect();
    sort_stacks(&mut stacks);
    stacks
}

/// What makes two frames the same frame in a report: a named frame is its function, source
/// line, module and inlining, wherever in the function the return address was; an unnamed one
/// is its address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FrameKey {
    function: Option<String>,
    module: Option<String>,
    offset: Option<u64>,
    file: Option<String>,
    line: Option<u32>,
    inlined: bool,
}

impl FrameKey {
    fn of(f: &Frame) -> FrameKey {
        FrameKey {
            function: f.function.clone(),
            module: f.module.clone(),
            offset: if f.function.is_some() { None } else { f.offset },
            file: f.file.clone(),
            line: f.line,
            inlined: f.inlined,
        }
    }
}

/// One captured stack's frames, root first, named.
fn named_frames(
    capture: &Capture,
    s: &crate::capture::CapturedStack,
    names: &HashMap<crate::capture::Location, Vec<Frame>>,
) -> Vec<Frame> {
    // Leaf first in the kernel's order; reverse to root first, under its process's frame
    // when several processes were traced.
    let process = s
        .process
        .and_then(|p| capture.processes.get(p as usize))
        .map(|p| Frame::named(format!("{} [pid {}]", p.name, p.pid)));
    // Memory the program mapped itself stands apart, under a frame of its own.
    let mapped = s.mmap.then(|| Frame::named(MMAP_FRAME.into()));
    process
        .into_iter()
        .chain(mapped)
        .chain(s.frames.iter().rev().flat_map(|l| names[l].iter().cloned()))
        .collect()
}

/// The root frame of anonymous memory the program mapped itself.
pub const MMAP_FRAME: &str = "[anonymous mmap]";

/// Largest first; ties broken by the frames so that output is deterministic.
pub fn sort_stacks(stacks: &mut [StackReport]) {
    stacks.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.count.cmp(&a.count))
            .then_with(|| a.frames.cmp(&b.frames))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capture::{CapturedStack, Location},
        model::maps::Module,
    };

    struct Fake;
    impl Symbolize for Fake {
        fn symbolize(&mut self, module: &Module, offsets: &[u64]) -> Vec<Vec<Frame>> {
            offsets
                .iter()
                .map(|&o| {
                    // Two offsets name one frame: their stacks merge.
                    let mut f = Frame::unknown(Some(module.path.clone()), Some(o & !1));
                    f.function = Some(format!("f{:x}", o & !1));
                    vec![f]
                })
                .collect()
        }
    }

    fn stack(frames: &[u64], bytes: f64, count: f64, age: f64) -> CapturedStack {
        CapturedStack {
            lifetimes: None,
            class: None,
            frames: frames
                .iter()
                .map(|&offset| Location {
                    module: Some(0),
                    offset,
                })
                .collect(),
            truncated: false,
            partial: false,
            bytes,
            count,
            oldest_age_secs: age,
            process: None,
            mmap: false,
        }
    }

    #[test]
    fn names_groups_and_sorts() {
        let capture = Capture {
            timeline: None,
            meta: Meta::default(),
            modules: vec![Module {
                path: "/bin/x".into(),
                build_id: None,
                ..Default::default()
            }],
            mappings: Vec::new(),
            stacks: vec![
                stack(&[0xa, 0xb, 0xc], 100.0, 1.0, 9.0),
                stack(&[0xa, 0xb, 0xd], 50.4, 1.4, 3.0),
                stack(&[0xe], 160.0, 2.0, 1.0),
            ],
            processes: Vec::new(),
            allocated: None,
        };
        let r = aggregate(&capture, &mut Fake);
        assert_eq!(r.stacks.len(), 2);
        assert_eq!((r.stacks[0].bytes, r.stacks[0].count), (160, 2));
        assert_eq!((r.stacks[1].bytes, r.stacks[1].count), (150, 2));
        assert_eq!(r.stacks[1].oldest_age_secs, 9.0);
        let names: Vec<_> = r.stacks[1]
            .frames
            .iter()
            .map(|f| f.display_name())
            .collect();
        assert_eq!(names, ["fc", "fa", "fa"]);
        assert_eq!(r.meta.modules, capture.modules);
        assert_eq!(r.total_bytes(), 310);
    }
}
