//! `bridge-trace report`: a raw capture rendered again, later and elsewhere, without root or
//! the process: its frames named from this machine's files (checked against the build-ids
//! recorded) or from `--debug-dir`, then aggregated and rendered as `record` does.
use std::path::PathBuf;

use crate::{
    aggregate::{report_of, Rendered, View},
    capture::Capture,
    error::Result,
    output,
    render::{self, Format, RenderOptions},
};

/// A validated `bridge-trace report`.
#[derive(Clone, Debug)]
pub struct ReportConfig {
    pub capture: PathBuf,
    pub outputs: Vec<(PathBuf, Format)>,
    pub top: usize,
    pub view: View,
    pub debug_dirs: Vec<PathBuf>,
    pub mode: u32,
    /// Allocation wrappers a site is named past, beside those of the recording (`--wrapper`).
    pub wrappers: Vec<String>,
}

/// Runs `bridge-trace report`: renders every output first, then writes them.
pub fn run(config: &ReportConfig) -> Result<Rendered> {
    let mut capture = Capture::read(&config.capture)?;
    capture
        .meta
        .wrappers
        .user
        .extend(config.wrappers.iter().cloned());
    let rendered = report_of(&capture, &config.debug_dirs);
    let options = RenderOptions {
        top: config.top,
        view: config.view,
    };
    let bytes = render::render_all(&rendered.report, &config.outputs, options)?;
    output::write_all(&bytes, config.mode)?;
    Ok(rendered)
}
