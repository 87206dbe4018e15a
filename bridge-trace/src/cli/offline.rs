//! The offline commands' arguments, `report` and `diff`, and their validated configs.
use std::path::PathBuf;

use clap::Args;

use super::outputs_by_format;
use crate::{
    aggregate::View,
    cmd::{
        diff::{DiffConfig, DiffFormat},
        report::ReportConfig,
    },
    error::{Error, Result},
    output::check_writable,
    render::Format,
    units::parse_mode,
};
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    bridge-trace report leaks.btcap -o leaks.html\n  \
    bridge-trace report leaks.btcap --debug-dir ./symbols -o leaks.svg -o leaks.pb.gz\n  \
    bridge-trace report leaks.btcap --debuginfod https://debuginfod.debian.net -o leaks.svg")]
pub struct ReportArgs {
    /// The raw capture.
    pub capture: PathBuf,
    /// Where to write; repeat for several formats, each by its extension (.svg, .folded, .json,
    /// .txt, .pb.gz, .html) unless --format is given. `-` is standard output. Default: the
    /// text report on standard output.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Vec<PathBuf>,
    /// Format of the (single) output, overriding its extension.
    #[arg(long, short = 'f', value_enum)]
    pub format: Option<Format>,
    /// A directory holding the traced binaries or their debug files: by build-id
    /// (`.build-id/ab/cdef….debug`), by their path below it, or by file name. Repeatable;
    /// searched before this machine's own files and /usr/lib/debug.
    #[arg(long, value_name = "DIR")]
    pub debug_dir: Vec<PathBuf>,
    #[command(flatten)]
    pub debuginfod: super::DebuginfodArgs,
    /// How many call stacks the text report lists.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// What the flamegraph and folded outputs show: `inuse` (held when recording stopped),
    /// `alloc` (allocated while traced, freed or not; captures from version 3 on) or `peak`
    /// (held at the timeline's highest total; from version 4).
    #[arg(long, value_enum, default_value_t = View::Inuse)]
    pub view: View,
    /// An allocation wrapper of the program (a function that only forwards to the allocator):
    /// sites are named past it, at its callers. An exact name, or a prefix ending in `*`;
    /// repeatable. The C++ operators and well-known wrappers (xmalloc, g_malloc, zmalloc,
    /// CRYPTO_malloc, PyMem_Malloc, ...) are built in, with those given to `record`;
    /// others are detected from the stacks.
    #[arg(long, value_name = "NAME")]
    pub wrapper: Vec<String>,
    /// A suppression file in LeakSanitizer's format (`leak:FUNCTION`, `leak:libvendor.so`,
    /// `leak:file.c`; `*` wildcards, `^`/`$` anchors): held stacks with a matching frame are
    /// left out of the report, and counted and said per rule. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub suppress: Vec<PathBuf>,
    /// Apply the suppressions the program declares itself (its `__lsan_default_suppressions`).
    #[arg(long)]
    pub suppress_declared: bool,

    /// Permissions of the files written, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    pub mode: String,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The earlier recording: a raw capture (.btcap), folded stacks, or bridge-trace's .json.
    pub before: PathBuf,
    /// The later report.
    pub after: PathBuf,
    /// Where to write, by extension: .svg (differential flamegraph), .folded (`stack BEFORE
    /// AFTER` lines), .txt (the table of sites); repeatable. The table also goes to stdout.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Vec<PathBuf>,
    /// How many call sites the table lists.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// Permissions of the files written, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    pub mode: String,
}

/// Validates `report`'s arguments.
pub fn report_config(a: ReportArgs) -> Result<ReportConfig> {
    for dir in &a.debug_dir {
        if !dir.is_dir() {
            return Err(Error::Usage(format!(
                "--debug-dir {}: not a directory",
                dir.display()
            )));
        }
    }
    let outputs = if a.output.is_empty() {
        vec![(PathBuf::from("-"), a.format.unwrap_or(Format::Text))]
    } else {
        outputs_by_format(a.output, a.format)?
    };
    Ok(ReportConfig {
        capture: a.capture,
        outputs,
        top: a.top.max(1),
        view: a.view,
        debug_dirs: a.debug_dir,
        mode: parse_mode(&a.mode)?,
        wrappers: super::wrappers(a.wrapper)?,
        suppress: super::suppressions(&a.suppress)?,
        suppress_declared: a.suppress_declared,
        debuginfod: a.debuginfod.config()?,
    })
}

/// Validates `diff`'s arguments.
pub fn diff_config(a: DiffArgs) -> Result<DiffConfig> {
    let mut outputs = Vec::new();
    for path in a.output {
        let format = DiffFormat::from_path(&path).ok_or_else(|| {
            Error::Usage(format!(
                "cannot tell what to write to {} from its extension: use .svg, .folded or .txt",
                path.display()
            ))
        })?;
        check_writable(&path)?;
        outputs.push((path, format));
    }
    Ok(DiffConfig {
        before: a.before,
        after: a.after,
        outputs,
        top: a.top.max(1),
        mode: parse_mode(&a.mode)?,
    })
}
