//! `bridge-trace report`: a raw capture rendered again, later and elsewhere, without root or
//! the process: its frames named from this machine's files (checked against the build-ids
//! recorded) or from `--debug-dir`, then aggregated and rendered as `record` does.
use std::path::{Path, PathBuf};

use crate::{
    aggregate::{aggregate, Report},
    capture::Capture,
    cli::Format,
    error::{Error, Result},
    report::{self, RenderOptions},
    symbolize::Blazesym,
};

/// A validated `bridge-trace report`.
#[derive(Clone, Debug)]
pub struct ReportConfig {
    pub capture: PathBuf,
    pub outputs: Vec<(PathBuf, Format)>,
    pub top: usize,
    pub debug_dirs: Vec<PathBuf>,
    pub mode: u32,
}

/// What `report` produced.
pub struct Rendered {
    pub report: Report,
    /// Modules whose frames stayed unnamed: (module, frames, why).
    pub unnamed: Vec<(String, usize, String)>,
}

/// Reads a capture file; every failure is an input error naming the file.
pub fn load(path: &Path) -> Result<Capture> {
    let bad = |reason: String| Error::Input {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    Capture::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
}

/// The report of a capture, named from this machine's files and `debug_dirs`.
pub fn report_of(capture: &Capture, debug_dirs: &[PathBuf]) -> Rendered {
    let mut symbolizer = Blazesym::local(debug_dirs);
    let report = aggregate(capture, &mut symbolizer);
    Rendered {
        report,
        unnamed: symbolizer.unnamed(),
    }
}

/// Runs `bridge-trace report`: renders every output first, then writes them.
pub fn run(config: &ReportConfig) -> Result<Rendered> {
    let capture = load(&config.capture)?;
    let rendered = report_of(&capture, &config.debug_dirs);
    let options = RenderOptions { top: config.top };
    let bytes = report::render_all(&rendered.report, &config.outputs, options)?;
    report::write_all(&bytes, config.mode)?;
    Ok(rendered)
}
