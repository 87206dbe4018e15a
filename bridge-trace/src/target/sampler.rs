//! bridge-trace's own in-process sampler, `libbridge_trace_sampler.so` (the
//! `bridge-trace-sampler` crate): the binary carries it, as it carries its eBPF object, and
//! writes it where a process can load it (`bridge-trace sampler install DIR`, or
//! `record --sampler`, which preloads it into the program it launches).
use std::{
    ffi::OsString,
    fs,
    io::Write as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// The library, built by build.rs.
pub static LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libbridge_trace_sampler.so"));
/// Its mean sampling interval when nothing says otherwise (the library's own default).
pub const DEFAULT_INTERVAL: u64 = 512 << 10;
/// Its file name.
pub const FILE_NAME: &str = "libbridge_trace_sampler.so";
/// The environment variable that sets its mean sampling interval (bytes, or 512K, 2M, ...).
pub const INTERVAL_ENV: &str = "BRIDGE_TRACE_SAMPLE_INTERVAL";

/// Writes the library into `dir` (created 0755 if missing) as [`FILE_NAME`], readable and
/// loadable by every user, atomically (a process loading it never sees half a file); left as
/// it is when the same bytes are there already (a running process may have it mapped).
/// Returns its path.
pub fn install(dir: &Path) -> Result<PathBuf> {
    let err = |path: &Path, e: std::io::Error| Error::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(|e| err(dir, e))?;
    }
    let path = dir.join(FILE_NAME);
    if fs::read(&path).is_ok_and(|have| have == LIBRARY) {
        return Ok(path);
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".bridge-trace-sampler-")
        .tempfile_in(dir)
        .map_err(|e| err(dir, e))?;
    tmp.write_all(LIBRARY).map_err(|e| err(&path, e))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(|e| err(&path, e))?;
    tmp.as_file().sync_all().map_err(|e| err(&path, e))?;
    tmp.persist(&path).map_err(|e| err(&path, e.error))?;
    Ok(path)
}

/// Where `record --sampler` puts the library: a directory of its own under the system's
/// temporary directory, owned by root and not writable by others (a library every launched
/// program loads must not be replaceable by another user).
pub fn default_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(DIR_NAME);
    check_dir(&dir).map_err(|reason| Error::Output {
        path: dir.clone(),
        reason: format!(
            "{reason}: give the sampler a place with `bridge-trace sampler install DIR`"
        ),
    })?;
    Ok(dir)
}

/// The directory's name under a temporary directory (`record --sampler`, `--inject`).
pub const DIR_NAME: &str = concat!("bridge-trace-", env!("CARGO_PKG_VERSION"));

/// Whether `dir`, if it exists, is a directory of this user's that only it can write to: no
/// one else may swap the library a process is about to load.
pub fn check_dir(dir: &Path) -> std::result::Result<(), String> {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return Ok(());
    };
    // SAFETY: plain libc call.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(
            "exists and is not a directory of this user's that only it can write to".into(),
        );
    }
    Ok(())
}

/// `LD_PRELOAD` with `library` first, before what it held (`existing`).
pub fn preload(library: &Path, existing: Option<OsString>) -> OsString {
    let mut v = library.as_os_str().to_os_string();
    if let Some(old) = existing.filter(|o| !o.is_empty()) {
        v.push(":");
        v.push(old);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_carries_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let path = install(dir.path()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), LIBRARY);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o755);
        // Again: the same file is left in place.
        let inode = fs::metadata(&path).unwrap().ino();
        install(dir.path()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
        let c = crate::target::usdt::carrier("/x", &path).expect("otel_memory notes");
        let mut names: Vec<&str> = c.sites.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["alloc", "free"]);
        assert!(
            c.sites.iter().all(|s| s.semaphore.is_some()),
            "{:?}",
            c.sites
        );
        assert!(c.interposes && c.skipped.is_empty());
        // Each site is the 5-byte nop the kernel emulates (a shorter one it single-steps).
        for s in &c.sites {
            let at = s.offset as usize;
            assert_eq!(
                LIBRARY[at..at + 5],
                crate::target::usdt::SITE_NOP,
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn preload_goes_first() {
        let lib = Path::new("/s/lib.so");
        assert_eq!(preload(lib, None), "/s/lib.so");
        assert_eq!(preload(lib, Some("/a.so".into())), "/s/lib.so:/a.so");
    }
}
