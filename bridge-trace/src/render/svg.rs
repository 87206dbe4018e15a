//! An inferno flamegraph of the outstanding bytes: widths in bytes, the memory palette, a title
//! naming the target, its pid and the duration, and a subtitle with what was lost.
use inferno::flamegraph::{self, color::BasicPalette, Palette};

use super::{folded::folded_lines, Render};
use crate::aggregate::Report;

pub struct Svg;

impl Render for Svg {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()> {
        let m = &report.meta;
        let mut opts = flamegraph::Options::default();
        opts.title = format!(
            "bridge-trace: {} (pid {}), {:.1}s, memory never freed",
            m.target, m.pid, m.duration_secs
        );
        let caveats = report.caveats();
        opts.subtitle = Some(if caveats.is_empty() {
            format!(
                "{} bytes in {} allocations; nothing was lost",
                report.total_bytes(),
                report.total_count()
            )
        } else {
            caveats.join("; ")
        });
        opts.count_name = "bytes".into();
        opts.colors = Palette::Basic(BasicPalette::Mem);
        opts.deterministic = true;
        let lines = folded_lines(report);
        if lines.is_empty() {
            // inferno refuses empty input; draw a single empty frame instead.
            let placeholder = ["[no outstanding allocations] 1".to_string()];
            return flamegraph::from_lines(&mut opts, placeholder.iter().map(|s| s.as_str()), out)
                .map_err(std::io::Error::other);
        }
        flamegraph::from_lines(&mut opts, lines.iter().map(|s| s.as_str()), out)
            .map_err(std::io::Error::other)
    }
}
