//! Output files: where a path leads ([`Destination`]), checked before anything is traced, and
//! written atomically (a temporary file in the same directory, renamed into place), or in place
//! for standard output (`-`) and stream nodes (`/dev/null`, a FIFO); private by default and,
//! under sudo, the invoking user's.
use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// Writes every rendered output ([`write_output`]).
pub fn write_all(rendered: &[(PathBuf, Vec<u8>)], mode: u32) -> Result<()> {
    for (path, bytes) in rendered {
        write_output(path, bytes, mode)?;
    }
    Ok(())
}

/// Gives a file (or directory) bridge-trace created the permissions `mode` (a directory also
/// gets the search bit wherever `mode` can read) and, under sudo, to the invoking user: a
/// report asked for through sudo is the asking user's to read (at 0600, only theirs).
pub fn hand_over(file: &std::fs::File, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = if file.metadata()?.is_dir() {
        mode | ((mode & 0o444) >> 2)
    } else {
        mode
    };
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = crate::os::sudo_ids() {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Where an output path leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// `-`: standard output.
    Stdout,
    /// A FIFO, socket or character device node itself (`/dev/null`, a named pipe): written in
    /// place, since renaming over it would replace the node with a regular file.
    Stream,
    /// A regular file, new or replaced whole. A symbolic link at the path is replaced, never
    /// followed: a link planted where a root-run tracer writes cannot send its bytes elsewhere.
    File,
}

/// Where `path` leads, or why bridge-trace will not write there.
pub fn destination(path: &Path) -> std::result::Result<Destination, String> {
    use std::os::unix::fs::FileTypeExt as _;
    if path.as_os_str() == "-" {
        return Ok(Destination::Stdout);
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(Destination::File);
    };
    let kind = meta.file_type();
    if kind.is_fifo() || kind.is_socket() || kind.is_char_device() {
        return Ok(Destination::Stream);
    }
    if kind.is_dir() {
        return Err("it is a directory".into());
    }
    if kind.is_block_device() {
        return Err("it is a block device".into());
    }
    if kind.is_symlink() && std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        // Replacing it would replace, say, /dev/stdout; following it is what a planted link
        // wants.
        return Err(
            "it is a symbolic link to something other than a regular file, which \
             bridge-trace neither follows nor replaces (for standard output, use -o -)"
                .into(),
        );
    }
    Ok(Destination::File)
}

/// Writes `bytes` to `path` (see [`Destination`]); a file is written atomically: under a
/// temporary name in the same directory, renamed into place, so never half-written, with
/// permissions `mode` and, under sudo, owned by the invoking user.
pub fn write_output(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let out_err = |reason: String| Error::Output {
        path: path.to_path_buf(),
        reason,
    };
    match destination(path).map_err(out_err)? {
        Destination::Stdout => {
            let mut out = std::io::stdout().lock();
            return out
                .write_all(bytes)
                .and_then(|()| out.flush())
                .map_err(|e| out_err(e.to_string()));
        }
        Destination::Stream => {
            let mut stream = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| out_err(e.to_string()))?;
            return stream.write_all(bytes).map_err(|e| out_err(e.to_string()));
        }
        Destination::File => {}
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".bridge-trace-")
        .tempfile_in(dir)
        .map_err(|e| out_err(e.to_string()))?;
    tmp.write_all(bytes).map_err(|e| out_err(e.to_string()))?;
    hand_over(tmp.as_file(), mode).map_err(|e| out_err(e.to_string()))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| out_err(e.to_string()))?;
    tmp.persist(path)
        .map_err(|e| out_err(e.error.to_string()))?;
    Ok(())
}

/// Fails early, before anything is traced, when `path` could not be written.
pub fn check_writable(path: &Path) -> Result<()> {
    let err = |reason: &str| Error::Output {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    match destination(path).map_err(|reason| err(&reason))? {
        // Written in place: nothing to create.
        Destination::Stdout | Destination::Stream => return Ok(()),
        Destination::File => {}
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(err("its directory does not exist"));
    }
    let c = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes())
        .map_err(|_| err("the path contains a NUL byte"))?;
    // SAFETY: plain syscall on a valid C string.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(err("its directory is not writable"));
    }
    // access(2) ignores read-only mounts for root; statvfs does not.
    // SAFETY: plain syscall on a valid C string and a zeroed out-struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 && st.f_flag & libc::ST_RDONLY != 0 {
        return Err(err("its directory is on a read-only file system"));
    }
    Ok(())
}

/// Fails unless `dir` is a writable directory; one that does not exist is created, private.
pub fn check_dir(dir: &Path) -> Result<()> {
    let err = |reason: &str| Error::Output {
        path: dir.to_path_buf(),
        reason: reason.to_string(),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(err("not a directory")),
        Err(_) => {
            // Created, private (0700, under sudo the invoking user's), with its parents.
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| err(&format!("cannot create it: {e}")))?;
            let opened = std::fs::File::open(dir).map_err(|e| err(&e.to_string()))?;
            hand_over(&opened, 0o700).map_err(|e| err(&e.to_string()))?;
        }
    }
    tempfile::tempfile_in(dir)
        .map(drop)
        .map_err(|e| err(&format!("not writable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.txt");
        write_output(&p, b"one", 0o644).unwrap();
        write_output(&p, b"two", 0o644).unwrap();
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
        write_output(&fifo, b"report", 0o600).unwrap();
        assert_eq!(reader.join().unwrap(), b"report");
        let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
        assert!(kind.is_fifo(), "the FIFO was replaced: {kind:?}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn a_planted_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        let link = dir.path().join("report.txt");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        write_output(&link, b"report", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(std::fs::read(&link).unwrap(), b"report");
    }

    #[test]
    fn a_symlink_to_a_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("out");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        let e = write_output(&link, b"report", 0o600)
            .unwrap_err()
            .to_string();
        assert!(e.contains("-o -"), "{e}");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(destination(Path::new("-")), Ok(Destination::Stdout));
        assert_eq!(destination(Path::new("/dev/null")), Ok(Destination::Stream));
        assert!(destination(dir.path()).is_err());
    }
}
