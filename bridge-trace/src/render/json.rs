//! The whole report as JSON: metadata (with what was lost, counted and in words: `caveats`) and
//! every stack with its frames (module, offset, function, file, line), and the allocation
//! profile (`allocated`) and the timeline with its peak (`timeline`) where the capture has them.
use serde::Serialize;

use super::Render;
use crate::{
    aggregate::{suppress::Suppressed, Report, StackReport, TimelineReport},
    model::meta::Meta,
};

pub struct Json;

/// The report as written: its metadata with the caveats beside the counters.
#[derive(Serialize)]
struct Written<'a> {
    meta: WrittenMeta<'a>,
    stacks: &'a [StackReport],
    /// What each stack allocated while traced, freed or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    allocated: Option<&'a [StackReport]>,
    /// What was held over time, and at the peak.
    #[serde(skip_serializing_if = "Option::is_none")]
    timeline: Option<&'a TimelineReport>,
    /// What each suppression rule took out of `stacks`.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    suppressed: &'a [Suppressed],
}

#[derive(Serialize)]
struct WrittenMeta<'a> {
    #[serde(flatten)]
    meta: &'a Meta,
    /// What the numbers miss, one sentence each (which totals are lower bounds, and why).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    caveats: Vec<String>,
}

impl Render for Json {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()> {
        let written = Written {
            meta: WrittenMeta {
                meta: &report.meta,
                caveats: report.caveats(),
            },
            stacks: &report.stacks,
            allocated: report.allocated.as_deref(),
            timeline: report.timeline.as_ref(),
            suppressed: &report.suppressed,
        };
        serde_json::to_writer_pretty(&mut *out, &written)?;
        out.push(b'\n');
        Ok(())
    }
}
