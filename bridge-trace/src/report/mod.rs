//! Renders a [`Report`] in each output format, one renderer per format behind [`Render`], and
//! writes it atomically (a temporary file in the same directory, renamed into place).
mod folded;
mod json;
pub mod pprof;
mod svg;
mod text;

use std::{io::Write as _, path::Path};

use crate::{
    aggregate::Report,
    cli::Format,
    error::{Error, Result},
};

pub use folded::Folded;
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

/// Writes `bytes` to `path` atomically: never a half-written file at `path`.
///
/// A regular file (or a new one) is written under a temporary name in the same directory and
/// renamed into place. A path that names a stream instead — a device such as `/dev/null` or
/// `/dev/stdout`, a FIFO, a socket — is written directly: renaming over it would replace the
/// device node with a regular file. A symbolic link is followed, so the rename replaces the file
/// it points to and the link stays.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let out_err = |reason: String| Error::Output {
        path: path.to_path_buf(),
        reason,
    };
    let resolved;
    let path_in_place = match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => {
            let mut stream = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| out_err(e.to_string()))?;
            return stream.write_all(bytes).map_err(|e| out_err(e.to_string()));
        }
        Ok(_) => {
            resolved = std::fs::canonicalize(path).map_err(|e| out_err(e.to_string()))?;
            resolved.as_path()
        }
        Err(_) => path,
    };
    let dir = match path_in_place.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".bridge-trace-")
        .tempfile_in(dir)
        .map_err(|e| out_err(e.to_string()))?;
    tmp.write_all(bytes).map_err(|e| out_err(e.to_string()))?;
    // The temporary file is private (0600); a report is meant to be shared, like any new file.
    {
        use std::os::unix::fs::PermissionsExt as _;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| out_err(e.to_string()))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| out_err(e.to_string()))?;
    tmp.persist(path_in_place)
        .map_err(|e| out_err(e.error.to_string()))?;
    Ok(())
}

/// A frame name safe for folded lines (`;` separates frames).
pub(crate) fn folded_name(name: &str) -> String {
    name.replace(';', ":")
}

/// Human-readable bytes: 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn a_stream_is_written_in_place_not_replaced() {
        use std::os::unix::fs::FileTypeExt as _;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out.fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_atomic(&fifo, b"report").unwrap();
        assert_eq!(reader.join().unwrap(), b"report");
        let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
        assert!(kind.is_fifo(), "the FIFO was replaced: {kind:?}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn a_symlink_keeps_pointing_at_the_new_report() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.txt");
        let link = dir.path().join("link.txt");
        std::fs::write(&real, b"old").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
    }
}
