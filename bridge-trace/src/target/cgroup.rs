//! Processes by cgroup (v2): where the unified hierarchy is mounted, the processes of a cgroup
//! and its descendants, and what a process's own cgroup says of it (its path, a container id).
use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// `statfs` magic of a cgroup v2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The mount point of the cgroup v2 hierarchy: `/sys/fs/cgroup` on a unified system,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn hierarchy() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER"
        let (fields, tail) = line.split_once(" - ")?;
        let point = fields.split(' ').nth(4)?;
        (tail.split(' ').next()? == "cgroup2").then(|| PathBuf::from(unescape(point)))
    })
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of the cgroup `arg` names: a path in the cgroup v2 file system, or one
/// relative to its mount point (`system.slice/nginx.service`), as systemd and `/proc/PID/cgroup`
/// write them.
pub fn resolve(arg: &Path) -> Result<PathBuf> {
    let root = hierarchy();
    let mut candidates = Vec::new();
    if arg.is_absolute() {
        candidates.push(arg.to_path_buf());
    }
    if let Some(root) = &root {
        candidates.push(root.join(arg.strip_prefix("/").unwrap_or(arg)));
    }
    if let Some(dir) = candidates
        .iter()
        .filter_map(|c| c.canonicalize().ok())
        .find(|d| is_cgroup2(d) && d.join("cgroup.procs").exists())
    {
        return Ok(dir);
    }
    let why = match (&root, candidates.iter().any(|c| c.exists())) {
        (None, _) => "no cgroup v2 hierarchy is mounted here".to_string(),
        (Some(root), true) => format!(
            "not a cgroup v2 directory (the v2 hierarchy is mounted at {})",
            root.display()
        ),
        (Some(root), false) => format!(
            "no such cgroup (the v2 hierarchy is mounted at {})",
            root.display()
        ),
    };
    Err(Error::Usage(format!("--cgroup {}: {why}", arg.display())))
}

/// Whether `dir` is on a cgroup v2 file system.
fn is_cgroup2(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct from a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) }) == 0 && st.f_type == CGROUP2_SUPER_MAGIC
}

/// The processes of the cgroup at `dir` and of all its descendants, lowest pid first. A cgroup
/// removed meanwhile (its service stopped) has none.
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        todo.extend(
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The cgroup a process is in, as it names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// Its v2 path (`/system.slice/docker-0123….scope`), from the reader's cgroup namespace.
    pub path: String,
    /// The container's id where the path carries one (Docker, containerd, CRI-O, Podman).
    pub container_id: Option<String>,
}

impl Membership {
    /// The labels its metrics carry.
    pub fn labels(&self) -> Vec<(String, String)> {
        let mut labels = vec![("cgroup".to_string(), self.path.clone())];
        if let Some(id) = &self.container_id {
            labels.push(("container_id".to_string(), id.clone()));
        }
        labels
    }

    /// Its OpenTelemetry resource attributes (semantic conventions `process.linux.cgroup`,
    /// the `/proc/PID/cgroup` line, and `container.id`).
    pub fn attributes(&self) -> Vec<(String, String)> {
        let mut attrs = vec![(
            "process.linux.cgroup".to_string(),
            format!("0::{}", self.path),
        )];
        if let Some(id) = &self.container_id {
            attrs.push(("container.id".to_string(), id.clone()));
        }
        attrs
    }
}

/// The v2 cgroup of `pid` (`0::PATH` in /proc/PID/cgroup).
pub fn membership(pid: u32) -> Option<Membership> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .to_string();
    let container_id = container_id(&path);
    Some(Membership { path, container_id })
}

/// The container id in a cgroup path: the innermost component holding 64 hex digits, alone or
/// with a runtime's prefix and suffix (`docker-ID.scope`, `cri-containerd-ID.scope`,
/// `crio-ID.scope`, `libpod-ID.scope`, `/docker/ID`, `/kubepods/…/ID`).
pub fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|component| {
        let stem = component.strip_suffix(".scope").unwrap_or(component);
        let id = stem.rsplit(['-', ':']).next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c3b1a2e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b";

    #[test]
    fn container_ids_of_the_runtimes() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods.slice/kubepods-burstable.slice/cri-containerd-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/docker/{ID}"),
            format!("/kubepods/besteffort/pod1234/crio-{ID}"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
        for path in [
            "/system.slice/nginx.service",
            "/",
            "/user.slice/user-1000.slice/session-3.scope",
            // 63 digits
            "/docker/4f1c3b1a2e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4",
        ] {
            assert_eq!(container_id(path), None, "{path}");
        }
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/mnt/a\\b"), r"/mnt/a\\b");
    }

    #[test]
    fn only_cgroup_directories() {
        assert!(matches!(resolve(Path::new("/tmp")), Err(Error::Usage(_))));
        assert!(matches!(
            resolve(Path::new("/no/such/cgroup")),
            Err(Error::Usage(_))
        ));
        // The hierarchy's root is a cgroup wherever it is mounted.
        if let Some(root) = hierarchy() {
            assert_eq!(
                resolve(Path::new("/")).unwrap(),
                root.canonicalize().unwrap()
            );
            assert_eq!(resolve(&root).unwrap(), root.canonicalize().unwrap());
        }
    }
}
