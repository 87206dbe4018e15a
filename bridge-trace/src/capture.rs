//! The raw capture: what a recording saw, before any symbol was looked up. Each stack is a list
//! of (module, file offset) with the modules' build-ids, beside the process's mappings, the
//! counters and the target's metadata. `record` writes it next to its rendered outputs
//! (`.btcap`) and renders from it; `bridge-trace report` renders it again later, on another
//! machine, without root or the process.
//!
//! On disk: the 8-byte [`MAGIC`], the format version (u32, little-endian), then the capture as
//! gzipped JSON (whose CRC catches corruption and whose trailer catches truncation). Readers
//! accept every version up to [`VERSION`].
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    path::Path,
};

use flate2::{read::GzDecoder, write::GzEncoder, Compression};
use serde::{Deserialize, Serialize};

use bridge_trace_common::LIFETIME_BUCKETS;

use crate::model::{
    classify::Class,
    maps::{Mapping, Module, ProcessMaps},
    meta::{Meta, Process},
    snapshot::{LiveAlloc, Snapshot},
    timeline::{Event, Point, Timeline},
};

/// First bytes of every capture: a non-ASCII byte (caught by 7-bit transfers), the name, and
/// CR LF (caught by newline conversion), as PNG does.
pub const MAGIC: &[u8; 8] = b"\x89BTCAP\r\n";
/// The format version this build writes; it reads this one and every older one. Version 2
/// added the followed children (`processes`, each stack's `process`); version 3 the
/// allocation profile (`allocated`); version 4 the timeline with its peak (`timeline`), the
/// lifetimes of the freed blocks per stack (`lifetimes`) and each held stack's class
/// (`class`).
pub const VERSION: u32 = 4;
/// The extension of capture files.
pub const EXTENSION: &str = "btcap";

/// Where one return address points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Location {
    /// Index into [`Capture::modules`]; `None`: the address was in no file mapping (then
    /// `offset` is the address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<u32>,
    /// File offset of the return address in the module.
    pub offset: u64,
}

/// The allocations still live on one call stack.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CapturedStack {
    /// The direct caller first, as the kernel walked it.
    pub frames: Vec<Location>,
    /// The walk hit its depth limit: the root side is missing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Only the direct caller is known (the stack could not be stored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// Bytes and allocations held: exact, or unbiased estimates when sampled.
    pub bytes: f64,
    pub count: f64,
    pub oldest_age_secs: f64,
    /// Index into [`Capture::processes`] when several processes were traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<u32>,
    /// Anonymous memory the program mapped itself (mmap, mremap), not through an allocator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mmap: bool,
    /// In the allocation profile: the recorded frees by how long their blocks lived, in the
    /// buckets of [`bridge_trace_common::LIFETIME_BOUNDS_NS`] (version 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetimes: Option<Vec<u64>>,
    /// Among what is held: leaking, cache, churn or undecided, from the windows the recording
    /// took ([`crate::model::classify`]; version 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
}

/// The recording over time (version 4): totals and resident memory at every point, the
/// stacks that held the most drawn one by one, the events, and the peak.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CapturedTimeline {
    /// Seconds between points, and between the ticks the peak was searched at.
    pub every_secs: f64,
    pub peak_every_secs: f64,
    pub points: Vec<Point>,
    pub series: Vec<CapturedSeries>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<CapturedPeak>,
}

impl CapturedTimeline {
    /// The stacks it names: its series', then its peak's.
    pub fn stacks(&self) -> impl Iterator<Item = &CapturedStack> {
        let series = self.series.iter().map(|s| &s.stack);
        series.chain(self.peak.iter().flat_map(|p| &p.stacks))
    }
}

/// One stack's bytes held at every point of the timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CapturedSeries {
    pub stack: CapturedStack,
    pub bytes: Vec<f64>,
}

/// The highest total held, when, and the stacks that held it (no ages: only totals are read
/// at a tick).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CapturedPeak {
    pub at_secs: f64,
    pub bytes: f64,
    pub count: f64,
    pub stacks: Vec<CapturedStack>,
}

/// One recording, unsymbolized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    pub meta: Meta,
    pub modules: Vec<Module>,
    /// Every file mapping the process had while traced.
    pub mappings: Vec<Mapping>,
    /// Largest first.
    pub stacks: Vec<CapturedStack>,
    /// With `--follow-children`: the first process, then each child followed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<Process>,
    /// The allocation profile: what each stack allocated while traced, freed or not (`bytes`
    /// and `count` allocated, no age), most bytes first. `None` in a capture older than
    /// version 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Vec<CapturedStack>>,
    /// `None` in a capture older than version 4, or when no tick was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<CapturedTimeline>,
}

/// Why a file is not a capture this build can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    #[error("not a bridge-trace capture (it does not start with the capture header)")]
    NotACapture,
    #[error(
        "capture format version {found} is newer than this bridge-trace reads (up to \
         {VERSION}): use a newer bridge-trace"
    )]
    FutureVersion { found: u32 },
    #[error("capture format version 0 does not exist: the file is corrupted")]
    VersionZero,
    #[error("truncated capture: the file ends early")]
    Truncated,
    #[error("corrupted capture: {0}")]
    Corrupted(String),
}

impl Capture {
    /// The capture of `snapshot`: allocations younger than `min_age_ns` left out (and counted
    /// in the metadata), the rest grouped by raw stack, each address placed in the mapping
    /// that held it.
    pub fn new(
        snapshot: &Snapshot,
        maps: &ProcessMaps,
        min_age_ns: Option<u64>,
        mut meta: Meta,
    ) -> Capture {
        let now = snapshot.taken_ns;
        let mut locator = Locator::new(maps);
        let mut younger = 0u64;
        let mut groups: HashMap<(Vec<Location>, bool, bool, bool), CapturedStack> = HashMap::new();
        let heap = snapshot.allocs.iter().map(|a| (a, false));
        let mapped = snapshot.regions.iter().map(|r| (r, true));
        for (a, mmap) in heap.chain(mapped) {
            let age_ns = now.saturating_sub(a.ts_ns);
            if min_age_ns.is_some_and(|min| age_ns < min) {
                younger += 1;
                continue;
            }
            let (addrs, truncated, partial) = raw_stack(snapshot, a);
            let frames: Vec<Location> = addrs.iter().map(|&addr| locator.locate(addr)).collect();
            let entry = groups
                .entry((frames.clone(), truncated, partial, mmap))
                .or_insert_with(|| CapturedStack {
                    frames,
                    truncated,
                    partial,
                    mmap,
                    ..CapturedStack::default()
                });
            let (bytes, count) = a.estimate();
            entry.bytes += bytes;
            entry.count += count;
            entry.oldest_age_secs = entry.oldest_age_secs.max(age_ns as f64 / 1e9);
        }
        meta.younger_than_min_age = younger;
        let mut allocated: HashMap<(Vec<Location>, bool, bool), CapturedStack> = HashMap::new();
        for a in &snapshot.allocated {
            let (addrs, truncated, partial) = stored_stack(snapshot, a.stack_id, a.ret_addr);
            let frames: Vec<Location> = addrs.iter().map(|&addr| locator.locate(addr)).collect();
            let entry = allocated
                .entry((frames.clone(), truncated, partial))
                .or_insert_with(|| CapturedStack {
                    frames,
                    truncated,
                    partial,
                    lifetimes: Some(vec![0; LIFETIME_BUCKETS]),
                    ..CapturedStack::default()
                });
            entry.bytes += a.bytes;
            entry.count += a.count;
            add_lifetimes(&mut entry.lifetimes, &a.lifetimes);
        }
        let mut capture = Capture {
            meta,
            modules: locator.modules,
            mappings: maps.mappings.clone(),
            stacks: groups.into_values().collect(),
            processes: Vec::new(),
            allocated: Some(allocated.into_values().collect()),
            timeline: None,
        };
        capture.sort();
        capture
    }

    /// The capture with `timeline`, its stacks placed as [`Capture::new`] placed the
    /// snapshot's (the snapshot taken at the end holds every stack a tick saw).
    pub fn with_timeline(
        mut self,
        timeline: &Timeline,
        snapshot: &Snapshot,
        maps: &ProcessMaps,
    ) -> Capture {
        let mut locator = Locator::resume(maps, std::mem::take(&mut self.modules));
        let mut stack = |stack_id, ret_addr, bytes, count| {
            let (addrs, truncated, partial) = stored_stack(snapshot, stack_id, ret_addr);
            CapturedStack {
                frames: addrs.iter().map(|&a| locator.locate(a)).collect(),
                truncated,
                partial,
                bytes,
                count,
                ..CapturedStack::default()
            }
        };
        let series = timeline
            .series
            .iter()
            .map(|((id, ret), bytes)| CapturedSeries {
                stack: stack(*id, *ret, bytes.iter().copied().fold(0.0, f64::max), 0.0),
                bytes: bytes.clone(),
            })
            .collect();
        let peak = timeline.peak.as_ref().map(|p| {
            let mut stacks: Vec<CapturedStack> = p
                .held
                .iter()
                .map(|h| stack(h.stack_id, h.ret_addr, h.bytes, h.count))
                .collect();
            sort_stacks(&mut stacks);
            CapturedPeak {
                at_secs: p.at_secs,
                bytes: p.bytes,
                count: p.count,
                stacks,
            }
        });
        self.timeline = Some(CapturedTimeline {
            every_secs: timeline.every_secs,
            peak_every_secs: timeline.peak_every_secs,
            points: timeline.points.clone(),
            series,
            events: timeline.events.clone(),
            peak,
        });
        self.modules = locator.modules;
        self
    }

    /// Marks each held stack with the class `class_of` gives its allocations in `snapshot` (the
    /// class of their call site): the most alarming of them when they differ.
    pub fn with_classes(
        mut self,
        class_of: impl Fn(&LiveAlloc) -> Option<Class>,
        snapshot: &Snapshot,
        maps: &ProcessMaps,
    ) -> Capture {
        let mut locator = Locator::resume(maps, std::mem::take(&mut self.modules));
        let mut by_frames: HashMap<(Vec<Location>, bool), Class> = HashMap::new();
        for a in &snapshot.allocs {
            let Some(class) = class_of(a) else { continue };
            let (addrs, _, partial) = raw_stack(snapshot, a);
            let frames = addrs.iter().map(|&a| locator.locate(a)).collect();
            let c = by_frames.entry((frames, partial)).or_insert(class);
            *c = c.worst(class);
        }
        for s in self.stacks.iter_mut().filter(|s| !s.mmap) {
            if let Some(c) = by_frames.get(&(s.frames.clone(), s.partial)) {
                s.class = Some(c.name().into());
            }
        }
        self.modules = locator.modules;
        self
    }

    /// Largest first, ties in a fixed order.
    fn sort(&mut self) {
        sort_stacks(&mut self.stacks);
        if let Some(a) = &mut self.allocated {
            sort_stacks(a);
        }
    }

    /// One capture of a process and the children it forked, each stack marked with its
    /// process: `self` is the first process's, named `name`.
    pub fn with_children(mut self, name: &str, children: Vec<(Process, Capture)>) -> Capture {
        self.processes = vec![Process {
            pid: self.meta.pid,
            name: name.to_string(),
            parent: None,
            mappings: Vec::new(),
        }];
        for s in self
            .stacks
            .iter_mut()
            .chain(self.allocated.iter_mut().flatten())
        {
            s.process = Some(0);
        }
        for (mut process, child) in children {
            let index = self.processes.len() as u32;
            let modules: Vec<u32> = child
                .modules
                .into_iter()
                .map(|m| match self.modules.iter().position(|x| *x == m) {
                    Some(i) => i as u32,
                    None => {
                        self.modules.push(m);
                        self.modules.len() as u32 - 1
                    }
                })
                .collect();
            let remap = |mut s: CapturedStack| {
                for l in &mut s.frames {
                    l.module = l.module.map(|m| modules[m as usize]);
                }
                s.process = Some(index);
                s
            };
            self.stacks.extend(child.stacks.into_iter().map(remap));
            match (&mut self.allocated, child.allocated) {
                (Some(mine), Some(theirs)) => mine.extend(theirs.into_iter().map(remap)),
                // One without the profile: none for all.
                _ => self.allocated = None,
            }
            self.meta.younger_than_min_age += child.meta.younger_than_min_age;
            process.mappings = child.mappings;
            self.processes.push(process);
        }
        self.sort();
        self
    }

    /// Reads a capture file; every failure is an input error naming the file.
    pub fn read(path: &Path) -> crate::error::Result<Capture> {
        let bad = |reason: String| crate::error::Error::Input {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        Capture::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
    }

    /// The capture as written to disk.
    pub fn to_bytes(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let mut gz = GzEncoder::new(out, Compression::default());
        serde_json::to_writer(&mut gz, self)?;
        gz.flush()?;
        gz.finish()
    }

    /// Reads a capture of any version up to [`VERSION`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Capture, CaptureError> {
        let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
            if MAGIC.starts_with(bytes) && !bytes.is_empty() {
                return Err(CaptureError::Truncated);
            }
            return Err(CaptureError::NotACapture);
        };
        let Some((version, body)) = rest.split_first_chunk::<4>() else {
            return Err(CaptureError::Truncated);
        };
        match u32::from_le_bytes(*version) {
            0 => return Err(CaptureError::VersionZero),
            found if found > VERSION => return Err(CaptureError::FutureVersion { found }),
            _ => {}
        }
        let mut json = Vec::new();
        GzDecoder::new(body)
            .read_to_end(&mut json)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => CaptureError::Truncated,
                _ => CaptureError::Corrupted(e.to_string()),
            })?;
        let capture: Capture = serde_json::from_slice(&json)
            .map_err(|e| CaptureError::Corrupted(format!("its contents do not parse: {e}")))?;
        capture.check()?;
        Ok(capture)
    }

    /// What serde cannot check: every frame's module and every stack's process exists.
    fn check(&self) -> Result<(), CaptureError> {
        let n = self.modules.len() as u32;
        let processes = self.processes.len() as u32;
        let timeline = self.timeline.iter().flat_map(CapturedTimeline::stacks);
        for s in self
            .stacks
            .iter()
            .chain(self.allocated.iter().flatten())
            .chain(timeline)
        {
            if let Some(bad) = s.process.filter(|&p| p >= processes) {
                return Err(CaptureError::Corrupted(format!(
                    "a stack names process {bad}, but there are {processes}"
                )));
            }
            if let Some(bad) = s.frames.iter().find_map(|l| l.module.filter(|&m| m >= n)) {
                return Err(CaptureError::Corrupted(format!(
                    "a frame names module {bad}, but there are {n}"
                )));
            }
        }
        Ok(())
    }
}

/// Adds `lifetimes` (buckets of freed blocks) into `sum`, which takes their length if empty.
pub fn add_lifetimes(sum: &mut Option<Vec<u64>>, lifetimes: &[u64]) {
    let sum = sum.get_or_insert_with(|| vec![0; lifetimes.len()]);
    for (a, b) in sum.iter_mut().zip(lifetimes) {
        *a += b;
    }
}

/// Keeps the regions the program mapped itself: a region whose direct caller is in an
/// allocator's object (`allocators`, their paths) is that allocator's own memory (glibc's
/// malloc maps large blocks, jemalloc its extents), already counted as the allocations in it.
pub fn keep_own_mappings(snapshot: &mut Snapshot, maps: &ProcessMaps, allocators: &[String]) {
    snapshot.regions.retain(|r| {
        !maps
            .lookup(r.ret_addr)
            .is_some_and(|m| allocators.contains(&m.path))
    });
}

/// Places return addresses of a process in the file mappings that held them, numbering each
/// module (with its build-id) the first time one of its addresses is placed.
pub struct Locator<'a> {
    maps: &'a ProcessMaps,
    /// The modules placed so far, in [`Location::module`] order.
    pub modules: Vec<Module>,
    index: HashMap<String, u32>,
    placed: HashMap<u64, Location>,
}

impl<'a> Locator<'a> {
    pub fn new(maps: &'a ProcessMaps) -> Locator<'a> {
        Locator::resume(maps, Vec::new())
    }

    /// A locator that numbers modules after `modules`, placed already.
    pub fn resume(maps: &'a ProcessMaps, modules: Vec<Module>) -> Locator<'a> {
        let index = modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.path.clone(), i as u32))
            .collect();
        Locator {
            maps,
            modules,
            index,
            placed: HashMap::new(),
        }
    }

    /// Where `addr` points: (module, file offset), or the bare address outside every mapping.
    pub fn locate(&mut self, addr: u64) -> Location {
        if let Some(l) = self.placed.get(&addr) {
            return *l;
        }
        let location = match self.maps.lookup(addr) {
            Some(m) => {
                let index = match self.index.get(&m.path) {
                    Some(&i) => i,
                    None => {
                        self.modules.push(Module {
                            path: m.path.clone(),
                            build_id: self.maps.build_id(&m.path),
                            segments: self.maps.segments(&m.path),
                        });
                        let i = self.modules.len() as u32 - 1;
                        self.index.insert(m.path.clone(), i);
                        i
                    }
                };
                Location {
                    module: Some(index),
                    offset: addr - m.start + m.offset,
                }
            }
            None => Location {
                module: None,
                offset: addr,
            },
        };
        self.placed.insert(addr, location);
        location
    }
}

/// An allocation's stack: the stored frames, or just the direct caller. (addresses, truncated,
/// partial)
fn raw_stack(snapshot: &Snapshot, a: &LiveAlloc) -> (Vec<u64>, bool, bool) {
    stored_stack(snapshot, a.stack_id, a.ret_addr)
}

/// Stack `id`'s frames, or just `ret_addr` (the direct caller) when it was not stored.
fn stored_stack(snapshot: &Snapshot, id: u64, ret_addr: u64) -> (Vec<u64>, bool, bool) {
    match snapshot.stacks.get(&id) {
        Some(s) => (s.frames.clone(), s.truncated, false),
        None => (vec![ret_addr], false, true),
    }
}
/// Largest first, ties in a fixed order.
fn sort_stacks(stacks: &mut [CapturedStack]) {
    stacks.sort_by(|a, b| {
        b.bytes
            .total_cmp(&a.bytes)
            .then(b.count.total_cmp(&a.count))
            .then_with(|| a.process.cmp(&b.process))
            .then(a.mmap.cmp(&b.mmap))
            .then_with(|| a.frames.cmp(&b.frames))
            .then(a.truncated.cmp(&b.truncated))
            .then(a.partial.cmp(&b.partial))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::snapshot::RawStack;

    fn capture() -> Capture {
        let mapping = Mapping {
            start: 0x1000,
            end: 0x3000,
            offset: 0x400,
            executable: true,
            dev: "0:0".into(),
            inode: 1,
            path: "/bin/x".into(),
        };
        let maps = ProcessMaps::new(1, vec![mapping]);
        let mut snap = Snapshot {
            taken_ns: 10_000_000_000,
            ..Default::default()
        };
        snap.stacks.insert(
            7,
            RawStack {
                frames: vec![0x1010, 0x2020, 0x9999],
                truncated: false,
            },
        );
        let alloc = |size, ts_ns, stack_id, ret_addr| LiveAlloc {
            addr: ts_ns,
            size,
            ts_ns,
            stack_id,
            ret_addr,
            kind: None,
            tid: 1,
            interval: 0,
        };
        snap.allocs = vec![
            alloc(100, 1_000_000_000, 7, 0x1010),
            alloc(50, 2_000_000_000, 7, 0x1010),
            alloc(500, 9_500_000_000, 7, 0x1010),
            alloc(30, 3_000_000_000, 0, 0x1050),
        ];
        Capture::new(&snap, &maps, Some(1_000_000_000), Meta::default())
    }

    #[test]
    fn groups_by_raw_stack_in_file_offsets() {
        let c = capture();
        assert_eq!(c.meta.younger_than_min_age, 1);
        assert_eq!(c.modules.len(), 1);
        assert_eq!(c.stacks.len(), 2);
        let s = &c.stacks[0];
        assert_eq!((s.bytes, s.count, s.oldest_age_secs), (150.0, 2.0, 9.0));
        let at = |module, offset| Location { module, offset };
        assert_eq!(
            s.frames,
            [at(Some(0), 0x410), at(Some(0), 0x1420), at(None, 0x9999)]
        );
        assert!(c.stacks[1].partial);
        assert_eq!(c.stacks[1].frames, [at(Some(0), 0x450)]);
    }

    #[test]
    fn round_trips_and_says_what_is_wrong() {
        let c = capture();
        let bytes = c.to_bytes().unwrap();
        assert_eq!(Capture::from_bytes(&bytes).unwrap(), c);

        let err = |b: &[u8]| Capture::from_bytes(b).unwrap_err();
        assert_eq!(err(b"x,y 1\n"), CaptureError::NotACapture);
        assert_eq!(err(b""), CaptureError::NotACapture);
        assert_eq!(err(&bytes[..5]), CaptureError::Truncated);
        assert_eq!(err(&bytes[..10]), CaptureError::Truncated);
        assert_eq!(err(&bytes[..bytes.len() - 3]), CaptureError::Truncated);
        let mut future = bytes.clone();
        future[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        assert_eq!(
            err(&future),
            CaptureError::FutureVersion { found: VERSION + 1 }
        );
        let mut flipped = bytes.clone();
        let mid = bytes.len() / 2;
        flipped[mid] ^= 0x55;
        assert!(
            matches!(err(&flipped), CaptureError::Corrupted(_)),
            "{:?}",
            err(&flipped)
        );
    }
}
