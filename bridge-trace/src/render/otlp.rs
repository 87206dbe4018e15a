//! OTLP profiles (`profiles/v1development`, in the types the OpenTelemetry project generates:
//! opentelemetry-proto): a report as one `ExportProfilesServiceRequest` — a profile per memory
//! sample type (`inuse_space`, `inuse_objects`, and with an allocation profile `alloc_space`,
//! `alloc_objects`) sharing one dictionary; the process and host as resource attributes (with
//! any the caller adds: a cgroup, a container id); one mapping per module with its GNU
//! build-id; locations by (module, file offset), the functions inlined there innermost first,
//! as in [`super::pprof`].
use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    profiles::v1development::{
        Function, KeyValueAndUnit, Line, Location, Mapping, Profile, ProfilesDictionary,
        ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
    },
    resource::v1::Resource,
};

use super::pprof::address_groups;
use crate::{
    aggregate::{Report, StackReport},
    symbolize::Frame,
};

/// The attribute a mapping's build-id goes in (OpenTelemetry semantic conventions).
pub const BUILD_ID_ATTRIBUTE: &str = "process.executable.build_id.gnu";

/// The dictionary being built: every table starts with its zero value, as the format wants.
struct Dictionary {
    dict: ProfilesDictionary,
    strings: HashMap<String, i32>,
    functions: HashMap<(String, String), i32>,
    mappings: HashMap<String, i32>,
    locations: HashMap<(String, u64, String), i32>,
    stacks: HashMap<Vec<i32>, i32>,
    attributes: HashMap<(String, String), i32>,
    build_ids: HashMap<String, String>,
}

impl Dictionary {
    fn new(report: &Report) -> Dictionary {
        let dict = ProfilesDictionary {
            mapping_table: vec![Mapping::default()],
            location_table: vec![Location::default()],
            function_table: vec![Function::default()],
            link_table: vec![Default::default()],
            string_table: vec![String::new()],
            attribute_table: vec![KeyValueAndUnit::default()],
            stack_table: vec![Stack::default()],
        };
        Dictionary {
            strings: HashMap::from([(String::new(), 0)]),
            stacks: HashMap::from([(Vec::new(), 0)]),
            dict,
            functions: HashMap::new(),
            mappings: HashMap::new(),
            locations: HashMap::new(),
            attributes: HashMap::new(),
            build_ids: report
                .meta
                .modules
                .iter()
                .filter_map(|m| Some((m.path.clone(), m.build_id.clone()?)))
                .collect(),
        }
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.dict.string_table.len() as i32;
        self.dict.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn attribute(&mut self, key: &str, value: &str) -> i32 {
        let k = (key.to_string(), value.to_string());
        if let Some(&i) = self.attributes.get(&k) {
            return i;
        }
        let i = self.dict.attribute_table.len() as i32;
        let key_strindex = self.string(key);
        self.dict.attribute_table.push(KeyValueAndUnit {
            key_strindex,
            value: Some(string_value(value)),
            unit_strindex: 0,
        });
        self.attributes.insert(k, i);
        i
    }

    fn function(&mut self, f: &Frame) -> i32 {
        let key = (
            f.display_name().to_string(),
            f.file.clone().unwrap_or_default(),
        );
        if let Some(&i) = self.functions.get(&key) {
            return i;
        }
        let (name, file) = (self.string(&key.0), self.string(&key.1));
        let i = self.dict.function_table.len() as i32;
        self.dict.function_table.push(Function {
            name_strindex: name,
            system_name_strindex: name,
            filename_strindex: file,
            start_line: 0,
        });
        self.functions.insert(key, i);
        i
    }

    fn mapping(&mut self, module: &str) -> i32 {
        if let Some(&i) = self.mappings.get(module) {
            return i;
        }
        let filename_strindex = self.string(module);
        let attribute_indices = match self.build_ids.get(module).cloned() {
            Some(id) => vec![self.attribute(BUILD_ID_ATTRIBUTE, &id)],
            None => Vec::new(),
        };
        let i = self.dict.mapping_table.len() as i32;
        self.dict.mapping_table.push(Mapping {
            filename_strindex,
            attribute_indices,
            ..Mapping::default()
        });
        self.mappings.insert(module.to_string(), i);
        i
    }

    /// The location of one address: `group` is its frames, outermost first.
    fn location(&mut self, group: &[&Frame]) -> i32 {
        let outer = group[0];
        let module = outer.module.clone().unwrap_or_default();
        let offset = outer.offset.unwrap_or(0);
        let key = (module.clone(), offset, outer.display_name().to_string());
        if let Some(&i) = self.locations.get(&key) {
            return i;
        }
        let mapping_index = if module.is_empty() {
            0
        } else {
            self.mapping(&module)
        };
        let lines = group
            .iter()
            .rev()
            .map(|f| Line {
                function_index: self.function(f),
                line: i64::from(f.line.unwrap_or(0)),
                column: 0,
            })
            .collect();
        let i = self.dict.location_table.len() as i32;
        self.dict.location_table.push(Location {
            mapping_index,
            // The file offset: frames are named already, the address is for telling apart.
            address: offset,
            lines,
            attribute_indices: Vec::new(),
        });
        self.locations.insert(key, i);
        i
    }

    /// The stack of a report's stack: its locations, leaf first.
    fn stack(&mut self, stack: &StackReport) -> i32 {
        let locations: Vec<i32> = address_groups(stack)
            .iter()
            .rev()
            .map(|g| self.location(g))
            .collect();
        if let Some(&i) = self.stacks.get(&locations) {
            return i;
        }
        let i = self.dict.stack_table.len() as i32;
        self.dict.stack_table.push(Stack {
            location_indices: locations.clone(),
        });
        self.stacks.insert(locations, i);
        i
    }
}

fn string_value(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_string())),
    }
}

fn key_value(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

/// The resource attributes of a report's process and host, then `extra`.
pub fn resource_attributes(report: &Report, extra: &[(String, String)]) -> Vec<KeyValue> {
    use any_value::Value::{IntValue, StringValue};
    let m = &report.meta;
    let mut attrs = vec![
        key_value("service.name", StringValue(m.target.clone())),
        key_value("process.pid", IntValue(i64::from(m.pid))),
        key_value("process.executable.name", StringValue(m.target.clone())),
        key_value("os.type", StringValue("linux".into())),
    ];
    if let Some(exe) = &m.exe {
        attrs.push(key_value(
            "process.executable.path",
            StringValue(exe.clone()),
        ));
    }
    if let Some(host) = &m.host {
        attrs.push(key_value("host.name", StringValue(host.clone())));
    }
    if let Some(kernel) = &m.kernel {
        attrs.push(key_value("os.version", StringValue(kernel.clone())));
    }
    for (k, v) in extra {
        attrs.push(key_value(k, StringValue(v.clone())));
    }
    attrs
}

/// The request carrying `report`, which ended at `end`; `extra` are resource attributes to add.
pub fn request(
    report: &Report,
    end: SystemTime,
    extra: &[(String, String)],
) -> ExportProfilesServiceRequest {
    let mut d = Dictionary::new(report);
    let duration = Duration::from_secs_f64(report.meta.duration_secs.max(0.0));
    let start = end.checked_sub(duration).unwrap_or(end);
    let time_unix_nano = start
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut kinds: Vec<(&str, &str, &[StackReport], bool)> = vec![
        ("inuse_space", "bytes", &report.stacks, true),
        ("inuse_objects", "count", &report.stacks, false),
    ];
    if let Some(allocated) = &report.allocated {
        kinds.push(("alloc_space", "bytes", allocated, true));
        kinds.push(("alloc_objects", "count", allocated, false));
    }
    let tier = report.meta.tier.clone().unwrap_or_default();
    let mut profiles = Vec::new();
    for (i, (kind, unit, stacks, bytes)) in kinds.into_iter().enumerate() {
        let mut samples: Vec<Sample> = Vec::new();
        let mut at: HashMap<i32, usize> = HashMap::new();
        for s in stacks {
            let value = if bytes { s.bytes } else { s.count } as i64;
            let stack_index = d.stack(s);
            let j = *at.entry(stack_index).or_insert_with(|| {
                samples.push(Sample {
                    stack_index,
                    values: vec![0],
                    ..Sample::default()
                });
                samples.len() - 1
            });
            samples[j].values[0] += value;
        }
        let sample_type = Some(ValueType {
            type_strindex: d.string(kind),
            unit_strindex: d.string(unit),
        });
        let period_type = Some(ValueType {
            type_strindex: d.string("space"),
            unit_strindex: d.string("bytes"),
        });
        let mut attribute_indices = Vec::new();
        if !tier.is_empty() {
            attribute_indices.push(d.attribute("bridge_trace.tier", &tier));
        }
        profiles.push(Profile {
            sample_type,
            samples,
            time_unix_nano,
            duration_nano: duration.as_nanos() as u64,
            period_type,
            period: report.meta.sample_interval.unwrap_or(1).max(1) as i64,
            profile_id: profile_id(report.meta.pid, time_unix_nano, i as u8),
            attribute_indices,
            ..Profile::default()
        });
    }
    ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles {
            resource: Some(Resource {
                attributes: resource_attributes(report, extra),
                ..Resource::default()
            }),
            scope_profiles: vec![ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "bridge-trace".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                profiles,
                ..ScopeProfiles::default()
            }],
            ..ResourceProfiles::default()
        }],
        dictionary: Some(d.dict),
    }
}

/// A profile's 16-byte id, unique per process, time and sample type (and never all zero).
fn profile_id(pid: u32, time: u64, kind: u8) -> Vec<u8> {
    let mut id = Vec::with_capacity(16);
    id.extend_from_slice(&time.to_be_bytes());
    id.extend_from_slice(&pid.to_be_bytes());
    id.extend_from_slice(&[0xb7, 0x7e, 0x01, kind.wrapping_add(1)]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{maps::Module, meta::Meta};
    use prost::Message as _;

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

    fn stack(frames: Vec<Frame>, bytes: u64, count: u64) -> StackReport {
        StackReport {
            bytes,
            count,
            oldest_age_secs: 0.0,
            frames,
            truncated: false,
            partial: false,
            wrappers: Vec::new(),
            lifetimes: None,
            class: None,
            runtime: None,
        }
    }

    /// Four profiles sharing one dictionary whose tables start with their zero values; stacks
    /// leaf first, inlined functions innermost first; the build-id on the mapping.
    #[test]
    fn four_sample_types_over_one_dictionary() {
        let leak = vec![
            frame("main", 0x10, false),
            frame("handle", 0x20, false),
            frame("parse", 0x20, true),
        ];
        let churn = vec![frame("main", 0x10, false), frame("churn", 0x30, false)];
        let report = Report {
            meta: Meta {
                target: "svc".into(),
                pid: 42,
                duration_secs: 2.0,
                host: Some("h1".into()),
                modules: vec![Module {
                    path: "/usr/bin/svc".into(),
                    build_id: Some("abcd".into()),
                    ..Default::default()
                }],
                ..Meta::default()
            },
            stacks: vec![stack(leak.clone(), 300, 3)],
            allocated: Some(vec![stack(churn, 9000, 90), stack(leak, 400, 4)]),
            timeline: None,
            suppressed: Vec::new(),
        };
        let end = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let extra = [("container.id".to_string(), "c0ffee".to_string())];
        let req = request(&report, end, &extra);
        let req = ExportProfilesServiceRequest::decode(&*req.encode_to_vec()).unwrap();
        let d = req.dictionary.as_ref().unwrap();
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.mapping_table[0], Mapping::default());
        assert_eq!(d.location_table[0], Location::default());
        assert_eq!(d.stack_table[0], Stack::default());
        let rp = &req.resource_profiles[0];
        let attrs: Vec<(&str, String)> = rp
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), format!("{:?}", kv.value)))
            .collect();
        assert!(attrs
            .iter()
            .any(|(k, v)| *k == "process.pid" && v.contains("42")));
        assert!(attrs
            .iter()
            .any(|(k, v)| *k == "container.id" && v.contains("c0ffee")));
        let profiles = &rp.scope_profiles[0].profiles;
        let s = |i: i32| d.string_table[i as usize].as_str();
        let kinds: Vec<&str> = profiles
            .iter()
            .map(|p| s(p.sample_type.unwrap().type_strindex))
            .collect();
        assert_eq!(
            kinds,
            [
                "inuse_space",
                "inuse_objects",
                "alloc_space",
                "alloc_objects"
            ]
        );
        assert_eq!(profiles[0].duration_nano, 2_000_000_000);
        assert_eq!(profiles[0].time_unix_nano, 1_699_999_998_000_000_000);
        let leaf_names = |p: &Profile| -> Vec<(Vec<String>, i64)> {
            p.samples
                .iter()
                .map(|smp| {
                    let st = &d.stack_table[smp.stack_index as usize];
                    let names = st
                        .location_indices
                        .iter()
                        .flat_map(|&l| &d.location_table[l as usize].lines)
                        .map(|line| {
                            s(d.function_table[line.function_index as usize].name_strindex)
                                .to_string()
                        })
                        .collect();
                    (names, smp.values[0])
                })
                .collect()
        };
        assert_eq!(
            leaf_names(&profiles[0]),
            [(vec!["parse".into(), "handle".into(), "main".into()], 300)]
        );
        assert_eq!(leaf_names(&profiles[1])[0].1, 3);
        let mut alloc = leaf_names(&profiles[2]);
        alloc.sort();
        assert_eq!(alloc[0], (vec!["churn".into(), "main".into()], 9000));
        assert_eq!(alloc[1].1, 400);
        // One mapping, with its build-id.
        assert_eq!(d.mapping_table.len(), 2);
        let m = &d.mapping_table[1];
        assert_eq!(s(m.filename_strindex), "/usr/bin/svc");
        let a = &d.attribute_table[m.attribute_indices[0] as usize];
        assert_eq!(s(a.key_strindex), BUILD_ID_ATTRIBUTE);
        assert_eq!(a.value, Some(string_value("abcd")));
        // The same stack in two profiles is one stack in the dictionary.
        assert_eq!(d.stack_table.len(), 3);
    }
}
