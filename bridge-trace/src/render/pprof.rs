//! pprof: a gzipped `profile.proto` (github.com/google/pprof/proto/profile.proto), as `go tool
//! pprof` and Pyroscope read it. Sample types `inuse_space` (bytes) and `inuse_objects`
//! (count), one sample per stack; one location per (module, file offset) holding the chain of
//! functions inlined there, innermost first; one mapping per module, with its build-id. Frames
//! are already named, so the profile says so (`has_functions`) and pprof does not try to
//! symbolize it again. Each sample keeps the allocation wrappers between its site and the
//! allocator; `drop_frames` holds the report's wrapper rule ([`crate::model::sites`]), so pprof
//! and Pyroscope name the same sites as every other output.
use std::{collections::HashMap, io::Write as _};

use flate2::{write::GzEncoder, Compression};
use prost::Message;

use super::Render;
use crate::{
    aggregate::{Report, StackReport},
    symbolize::Frame,
};

pub struct Pprof;

/// The messages of profile.proto that bridge-trace writes (field numbers from the spec).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

/// Builds the profile, interning strings, functions, mappings and locations.
#[derive(Default)]
struct Builder {
    profile: proto::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, String), u64>,
    mappings: HashMap<String, u64>,
    locations: HashMap<(String, u64, String), u64>,
    /// Build-id (hex) of each module that has one.
    build_ids: HashMap<String, String>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn function(&mut self, f: &Frame) -> u64 {
        let name = f.display_name().to_string();
        let file = f.file.clone().unwrap_or_default();
        if let Some(&id) = self.functions.get(&(name.clone(), file.clone())) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let (n, fl) = (self.string(&name), self.string(&file));
        self.profile.function.push(proto::Function {
            id,
            name: n,
            system_name: n,
            filename: fl,
        });
        self.functions.insert((name, file), id);
        id
    }

    fn mapping(&mut self, module: &str) -> u64 {
        if let Some(&id) = self.mappings.get(module) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(module);
        let build_id = match self.build_ids.get(module).cloned() {
            Some(id) => self.string(&id),
            None => 0,
        };
        self.profile.mapping.push(proto::Mapping {
            id,
            filename,
            build_id,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
            ..proto::Mapping::default()
        });
        self.mappings.insert(module.to_string(), id);
        id
    }

    /// The location of one address: `group` is its frames, outermost first.
    fn location(&mut self, group: &[&Frame]) -> u64 {
        let outer = group[0];
        let module = outer.module.clone().unwrap_or_default();
        let offset = outer.offset.unwrap_or(0);
        // Unknown addresses without a module are told apart by name only.
        let key = (module.clone(), offset, outer.display_name().to_string());
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let mapping_id = if module.is_empty() {
            0
        } else {
            self.mapping(&module)
        };
        let line = group
            .iter()
            .rev()
            .map(|f| proto::Line {
                function_id: self.function(f),
                line: i64::from(f.line.unwrap_or(0)),
            })
            .collect();
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(proto::Location {
            id,
            mapping_id,
            address: offset,
            line,
        });
        self.locations.insert(key, id);
        id
    }
}

/// A stack's frames grouped by return address, root first: each group is the frame of one
/// address, outermost first, then those inlined into it; the allocation wrappers last. One
/// location each, in pprof as in OTLP.
pub(super) fn address_groups(stack: &StackReport) -> Vec<Vec<&Frame>> {
    let mut groups: Vec<Vec<&Frame>> = Vec::new();
    for f in stack.frames.iter().chain(&stack.wrappers) {
        match groups.last_mut() {
            Some(g) if f.inlined => g.push(f),
            _ => groups.push(vec![f]),
        }
    }
    groups
}

/// The profile of a report (not yet encoded).
pub fn profile(report: &Report) -> proto::Profile {
    let mut b = Builder {
        build_ids: report
            .meta
            .modules
            .iter()
            .filter_map(|m| Some((m.path.clone(), m.build_id.clone()?)))
            .collect(),
        ..Builder::default()
    };
    b.string("");
    let value_type = |b: &mut Builder, t: &str, u: &str| proto::ValueType {
        r#type: b.string(t),
        unit: b.string(u),
    };
    b.profile.sample_type = vec![
        value_type(&mut b, "inuse_space", "bytes"),
        value_type(&mut b, "inuse_objects", "count"),
    ];
    if report.allocated.is_some() {
        // After the two every profile has, so that their indices stay.
        let alloc = [
            value_type(&mut b, "alloc_space", "bytes"),
            value_type(&mut b, "alloc_objects", "count"),
        ];
        b.profile.sample_type.extend(alloc);
    }
    let values = b.profile.sample_type.len();
    b.profile.period_type = Some(value_type(&mut b, "space", "bytes"));
    b.profile.period = 1;
    b.profile.default_sample_type = b.string("inuse_space");
    b.profile.duration_nanos = (report.meta.duration_secs * 1e9) as i64;
    b.profile.drop_frames = b.string(&report.meta.wrappers.drop_frames_regex());
    // One sample per stack: what it holds, then what it allocated.
    let mut samples: HashMap<Vec<u64>, usize> = HashMap::new();
    let held = report.stacks.iter().map(|s| (s, 0));
    let allocated = report.allocated.iter().flatten().map(|s| (s, 2));
    for (stack, at) in held.chain(allocated) {
        let location_id: Vec<u64> = address_groups(stack)
            .iter()
            .rev()
            .map(|g| b.location(g))
            .collect();
        let i = *samples.entry(location_id.clone()).or_insert_with(|| {
            b.profile.sample.push(proto::Sample {
                location_id,
                value: vec![0; values],
            });
            b.profile.sample.len() - 1
        });
        let v = &mut b.profile.sample[i].value;
        v[at] += stack.bytes as i64;
        v[at + 1] += stack.count as i64;
    }
    b.profile
}

impl Render for Pprof {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()> {
        let bytes = profile(report).encode_to_vec();
        // gzip with no time stamp in its header: the same report, the same bytes.
        let mut gz = GzEncoder::new(out, Compression::default());
        gz.write_all(&bytes)?;
        gz.finish()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::meta::{Meta, REPORT_VERSION};

    fn frame(function: &str, offset: u64, inlined: bool) -> Frame {
        Frame {
            function: Some(function.into()),
            module: Some("/usr/bin/svc".into()),
            offset: Some(offset),
            file: Some("svc.c".into()),
            line: Some(offset as u32),
            inlined,
        }
    }

    #[test]
    fn inlined_frames_share_their_location_innermost_first() {
        let report = Report {
            timeline: None,
            suppressed: Vec::new(),
            meta: Meta {
                version: REPORT_VERSION,
                target: "svc".into(),
                pid: 1,
                duration_secs: 2.0,
                target_exited: false,
                min_age_secs: None,
                allocator: "libc".into(),
                counters: Default::default(),
                younger_than_min_age: 0,
                unwind: None,
                programs: Vec::new(),
                sample_interval: None,
                ..Meta::default()
            },
            stacks: vec![StackReport {
                lifetimes: None,
                runtime: None,
                class: None,
                bytes: 300,
                count: 3,
                oldest_age_secs: 1.0,
                // main at 0x10, calling handle at 0x20 where parse is inlined.
                frames: vec![
                    frame("main", 0x10, false),
                    frame("handle", 0x20, false),
                    frame("parse", 0x20, true),
                ],
                truncated: false,
                partial: false,
                wrappers: vec![frame("xmalloc", 0x30, false)],
            }],
            allocated: None,
        };
        let p = profile(&report);
        let name = |id: u64| {
            let f = &p.function[id as usize - 1];
            p.string_table[f.name as usize].clone()
        };
        assert_eq!(p.sample.len(), 1);
        assert_eq!(p.sample[0].value, vec![300, 3]);
        // Leaf first: the wrapper, the location at 0x20, then main's.
        let locs: Vec<&proto::Location> = p.sample[0]
            .location_id
            .iter()
            .map(|&id| &p.location[id as usize - 1])
            .collect();
        assert_eq!(name(locs[0].line[0].function_id), "xmalloc");
        assert_eq!(locs[1].address, 0x20);
        let lines: Vec<String> = locs[1].line.iter().map(|l| name(l.function_id)).collect();
        assert_eq!(lines, ["parse", "handle"]);
        assert_eq!(name(locs[2].line[0].function_id), "main");
        // pprof drops the wrapper by the same rule.
        let drop = &p.string_table[p.drop_frames as usize];
        assert!(drop.contains("xmalloc(\\(.*)?"), "{drop}");
        assert_eq!(p.duration_nanos, 2_000_000_000);
        // Round trip through the encoding.
        let decoded = proto::Profile::decode(&*p.encode_to_vec()).unwrap();
        assert_eq!(decoded, p);
    }

    /// With an allocation profile: four sample types, one sample per stack holding what it
    /// holds and what it allocated; a stack that holds nothing has only the latter.
    #[test]
    fn the_allocation_profile_adds_two_sample_types() {
        let stack = |function: &str, bytes, count| StackReport {
            lifetimes: None,
            runtime: None,
            class: None,
            bytes,
            count,
            oldest_age_secs: 0.0,
            frames: vec![frame("main", 0x10, false), frame(function, 0x20, false)],
            truncated: false,
            partial: false,
            wrappers: Vec::new(),
        };
        let report = Report {
            timeline: None,
            suppressed: Vec::new(),
            meta: Meta::default(),
            stacks: vec![stack("leak", 100, 1)],
            allocated: Some(vec![stack("churn", 9000, 90), stack("leak", 400, 4)]),
        };
        let p = profile(&report);
        let types: Vec<&str> = p
            .sample_type
            .iter()
            .map(|t| p.string_table[t.r#type as usize].as_str())
            .collect();
        assert_eq!(
            types,
            [
                "inuse_space",
                "inuse_objects",
                "alloc_space",
                "alloc_objects"
            ]
        );
        let mut values: Vec<&[i64]> = p.sample.iter().map(|s| &s.value[..]).collect();
        values.sort();
        assert_eq!(values, [&[0, 0, 9000, 90][..], &[100, 1, 400, 4][..]]);
        assert_eq!(
            p.string_table[p.default_sample_type as usize],
            "inuse_space"
        );
    }
}
