//! `bridge-trace report`: a raw capture rendered again, later and elsewhere, without root or
//! the process: its frames named from this machine's files (checked against the build-ids
//! recorded), from `--debug-dir` or from debuginfod servers, then aggregated and rendered as
//! `record` does.
use std::path::PathBuf;

use crate::{
    aggregate::{
        report_of,
        suppress::{self, Suppressions},
        Rendered, View,
    },
    capture::Capture,
    error::{Error, Result},
    output,
    render::{self, Format, RenderOptions},
    symbolize::{Debuginfod, DebuginfodConfig},
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
    /// `--suppress` files' rules, and whether the program's own apply (`--suppress-declared`).
    pub suppress: Suppressions,
    pub suppress_declared: bool,
    /// Where the debug files missing here are fetched from (`--debuginfod`, DEBUGINFOD_URLS).
    pub debuginfod: Option<DebuginfodConfig>,
}

/// Runs `bridge-trace report`: renders every output first, then writes them.
pub fn run(config: &ReportConfig) -> Result<Rendered> {
    let mut capture = Capture::read(&config.capture)?;
    capture
        .meta
        .wrappers
        .user
        .extend(config.wrappers.iter().cloned());
    let debuginfod = config
        .debuginfod
        .as_ref()
        .map(Debuginfod::new)
        .transpose()?;
    let mut rendered = report_of(&capture, &config.debug_dirs, debuginfod);
    suppress::apply_all(
        &mut rendered.report,
        &config.suppress,
        config.suppress_declared,
    )
    .map_err(Error::Usage)?;
    let options = RenderOptions {
        top: config.top,
        view: config.view,
    };
    let bytes = render::render_all(&rendered.report, &config.outputs, options)?;
    output::write_all(&bytes, config.mode)?;
    Ok(rendered)
}
