//! An inferno flamegraph of the outstanding bytes: widths in bytes, the memory palette, a title
//! naming the target, its pid and the duration, and a subtitle with what was lost.
use inferno::flamegraph::{self, color::BasicPalette, Palette};

use super::{folded::folded_lines, Render};
use crate::aggregate::Report;

pub struct Svg;

/// The most characters of a subtitle that fit the default 1200-pixel width: inferno centres
/// it on one line and the ends of a longer one fall off the picture.
const SUBTITLE_CHARS: usize = 150;

/// The caveats as one subtitle that fits: all of them when they do, else the first (cut at a
/// word) and how many more the text and HTML reports give in full.
fn subtitle_of(caveats: &[String]) -> String {
    let all = caveats.join("; ");
    if all.chars().count() <= SUBTITLE_CHARS {
        return all;
    }
    let more = if caveats.len() > 1 {
        format!(" (+{} more notes in the text report)", caveats.len() - 1)
    } else {
        " (in full in the text report)".to_string()
    };
    let room = SUBTITLE_CHARS.saturating_sub(more.chars().count() + 1);
    let first = &caveats[0];
    let mut cut: String = first.chars().take(room).collect();
    if cut.len() < first.len() {
        if let Some(space) = cut.rfind(' ') {
            cut.truncate(space);
        }
        cut.push('…');
    }
    cut + &more
}

impl Render for Svg {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()> {
        flamegraph(report, false, out)
    }
}

/// The flamegraph of `report`; `bottom_up`: inverted, each call site at the root with its
/// callers above it (inferno's reversed stack order).
pub(crate) fn flamegraph(
    report: &Report,
    bottom_up: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    {
        let m = &report.meta;
        let mut opts = flamegraph::Options::default();
        opts.title = format!(
            "bridge-trace: {} (pid {}), {:.1}s, memory never freed{}",
            m.target,
            m.pid,
            m.duration_secs,
            if bottom_up {
                ", bottom-up (who calls each site)"
            } else {
                ""
            }
        );
        opts.reverse_stack_order = bottom_up;
        let caveats = report.caveats();
        opts.subtitle = Some(if caveats.is_empty() {
            format!(
                "{} bytes in {} allocations; nothing was lost",
                report.total_bytes(),
                report.total_count()
            )
        } else {
            subtitle_of(&caveats)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_fit_the_subtitle() {
        let short = vec!["3 stacks not stored".to_string()];
        assert_eq!(subtitle_of(&short), "3 stacks not stored");
        let long: Vec<String> = (0..4)
            .map(|i| {
                format!(
                    "note {i}: {}",
                    "a long explanation of what was lost ".repeat(3)
                )
            })
            .collect();
        let s = subtitle_of(&long);
        assert!(s.chars().count() <= SUBTITLE_CHARS, "{s}");
        assert!(
            s.starts_with("note 0: a long") && s.ends_with("(+3 more notes in the text report)"),
            "{s}"
        );
    }
}
