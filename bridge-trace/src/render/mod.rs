//! Renders a [`Report`] in each output [`Format`], one renderer per format behind [`Render`],
//! into memory; [`crate::output`] writes the bytes.
mod chart;
mod folded;
mod html;
mod json;
pub mod otlp;
pub mod pprof;
mod svg;
mod text;

use std::path::{Path, PathBuf};

use bridge_trace_common::{LIFETIME_BUCKETS, TEMPORARY_BUCKETS};
use clap::ValueEnum;

use crate::{
    aggregate::{Report, StackReport, View},
    error::{Error, Result},
};

pub use folded::{folded_lines, Folded};
pub use html::Html;
pub use json::Json;
pub use pprof::Pprof;
pub use svg::Svg;
pub use text::Text;

/// A report renderer: the same report in, one format's bytes out.
pub trait Render {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()>;
}

/// Presentation options shared by the renderers.
#[derive(Clone, Copy, Debug)]
pub struct RenderOptions {
    /// How many stacks the text report lists.
    pub top: usize,
    /// Which profile the flamegraph and the folded stacks show (the other formats carry both).
    pub view: View,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            top: 10,
            view: View::Inuse,
        }
    }
}

/// The renderer for a format.
pub fn renderer(format: Format, options: RenderOptions) -> Box<dyn Render> {
    match format {
        Format::Svg => Box::new(Svg),
        Format::Folded => Box::new(Folded),
        Format::Json => Box::new(Json),
        Format::Text => Box::new(Text { top: options.top }),
        Format::Pprof => Box::new(Pprof),
        Format::Html => Box::new(Html { top: options.top }),
    }
}

/// Renders into memory.
pub fn render_to_vec(report: &Report, format: Format, options: RenderOptions) -> Result<Vec<u8>> {
    let viewed;
    // The flamegraph and folded stacks show one profile; pprof carries in use and allocated
    // already, and shows the peak's stacks in place of the ones in use when asked.
    let viewed_formats = matches!(format, Format::Svg | Format::Folded)
        || (format == Format::Pprof && options.view == View::Peak);
    let report = if viewed_formats && options.view != View::Inuse {
        viewed = report.clone().view(options.view).map_err(Error::Usage)?;
        &viewed
    } else {
        report
    };
    let mut out = Vec::new();
    renderer(format, options)
        .render(report, &mut out)
        .map_err(|e| Error::io(format!("rendering the {format:?} report"), e))?;
    Ok(out)
}

/// Renders `report` in every `(path, format)` of `outputs`, in memory: rendered all first,
/// then written ([`crate::output::write_all`]), a failure leaves no partial set behind.
pub fn render_all(
    report: &Report,
    outputs: &[(PathBuf, Format)],
    options: RenderOptions,
) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    outputs
        .iter()
        .map(|(path, format)| Ok((path.clone(), render_to_vec(report, *format, options)?)))
        .collect()
}

/// A stack's call site: its name, and where it is (file:line, or module+offset).
pub(crate) fn site(s: &StackReport) -> (String, String) {
    let leaf = s.site();
    let name = leaf.map(|f| f.display_name()).unwrap_or("[unknown]");
    let at = match leaf {
        Some(f) => match (&f.file, f.line, &f.module, f.offset) {
            (Some(file), Some(line), _, _) => format!("{file}:{line}"),
            (Some(file), None, _, _) => file.clone(),
            (None, _, Some(module), Some(off)) => format!("{module}+{off:#x}"),
            _ => String::new(),
        },
        None => String::new(),
    };
    (name.to_string(), at)
}

/// One call site's share of the allocation profile, all its stacks together.
pub(crate) struct HotSite {
    pub name: String,
    pub at: String,
    pub bytes: u64,
    pub count: u64,
    /// Its recorded frees by lifetime bucket, when the capture has them.
    pub lifetimes: Option<Vec<u64>>,
}

/// The lifetime buckets' names ([`bridge_trace_common::LIFETIME_BOUNDS_NS`]).
pub(crate) const LIFETIME_NAMES: [&str; LIFETIME_BUCKETS] = [
    "< 1 ms",
    "1-10 ms",
    "10-100 ms",
    "0.1-1 s",
    "1-10 s",
    "10-100 s",
    "100-1000 s",
    "> 1000 s",
];

/// What a site's lifetimes say, in words: how many of its frees were of temporary blocks
/// (freed within 10 ms) and the bucket its median free falls in; `None` without frees.
pub(crate) fn describe_lifetimes(lifetimes: &[u64]) -> Option<String> {
    let freed: u64 = lifetimes.iter().sum();
    if freed == 0 {
        return None;
    }
    let temporary: u64 = lifetimes.iter().take(TEMPORARY_BUCKETS).sum();
    let mut seen = 0;
    let median = lifetimes
        .iter()
        .position(|&n| {
            seen += n;
            seen * 2 >= freed
        })
        .unwrap_or(0);
    Some(format!(
        "{freed} freed, {:.0}% temporary (within 10 ms), median lifetime {}",
        100.0 * temporary as f64 / freed as f64,
        LIFETIME_NAMES[median]
    ))
}

/// The `top` call sites that allocated the most bytes, each site's stacks summed (ties by name).
pub(crate) fn hottest_sites(allocated: &[StackReport], top: usize) -> Vec<HotSite> {
    type Sums = (u64, u64, Option<Vec<u64>>);
    let mut by_site: std::collections::BTreeMap<(String, String), Sums> = Default::default();
    for s in allocated {
        let e = by_site.entry(site(s)).or_default();
        e.0 += s.bytes;
        e.1 += s.count;
        if let Some(l) = &s.lifetimes {
            crate::capture::add_lifetimes(&mut e.2, l);
        }
    }
    let mut sites: Vec<HotSite> = by_site
        .into_iter()
        .map(|((name, at), (bytes, count, lifetimes))| HotSite {
            name,
            at,
            bytes,
            count,
            lifetimes,
        })
        .collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    sites.truncate(top);
    sites
}

/// A frame name safe for folded lines (`;` separates frames).
pub(crate) fn folded_name(name: &str) -> String {
    name.replace(';', ":")
}

/// Output formats, one renderer each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Interactive flamegraph (inferno), widths in bytes.
    Svg,
    /// One line per stack: frames root first joined by `;`, a space, bytes.
    Folded,
    /// Stacks with bytes, counts, ages and frames (module, offset, function, file, line).
    Json,
    /// The top stacks, readable in a terminal or a ticket.
    Text,
    /// Gzipped profile.proto for `go tool pprof`, Pyroscope and other pprof tools.
    Pprof,
    /// One self-contained page for a ticket: summary, caveats, top sites, the flamegraph.
    Html,
}

impl Format {
    pub fn from_extension(path: &Path) -> Option<Format> {
        if path.to_str()?.ends_with(".pb.gz") {
            return Some(Format::Pprof);
        }
        match path.extension()?.to_str()? {
            "svg" => Some(Format::Svg),
            "folded" | "collapsed" => Some(Format::Folded),
            "json" => Some(Format::Json),
            "txt" | "text" => Some(Format::Text),
            "pprof" => Some(Format::Pprof),
            "html" | "htm" => Some(Format::Html),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Svg => "svg",
            Format::Folded => "folded",
            Format::Json => "json",
            Format::Text => "txt",
            Format::Pprof => "pb.gz",
            Format::Html => "html",
        }
    }
}
