//! Folded stacks (the inferno / FlameGraph convention): one line per stack, frames root first
//! joined by `;`, a space, the outstanding bytes. Identical stacks are merged. A stack ends at
//! its site: the allocation wrappers above it are in the JSON and pprof outputs.
use std::collections::BTreeMap;

use super::{folded_name, Render};
use crate::aggregate::Report;

pub struct Folded;

/// The folded lines of a report, merged and sorted (deterministic).
pub fn folded_lines(report: &Report) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for s in &report.stacks {
        let key = s
            .frames
            .iter()
            .map(|f| folded_name(&f.folded_label()))
            .collect::<Vec<_>>()
            .join(";");
        *merged.entry(key).or_default() += s.bytes;
    }
    merged
        .into_iter()
        .map(|(stack, bytes)| format!("{stack} {bytes}"))
        .collect()
}

impl Render for Folded {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()> {
        for line in folded_lines(report) {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        Ok(())
    }
}
