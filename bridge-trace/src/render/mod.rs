//! Renders a [`Report`] in each output [`Format`], one renderer per format behind [`Render`],
//! into memory; [`crate::output`] writes the bytes.
mod folded;
mod html;
mod json;
pub mod pprof;
mod svg;
mod text;

use std::path::{Path, PathBuf};

use clap::ValueEnum;

use crate::{
    aggregate::Report,
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
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions { top: 10 }
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
