//! A process's memory maps: the file mappings of `/proc/PID/maps` ([`Mapping`]), and
//! [`ProcessMaps`], every mapping a process had while traced with the build-id of each file,
//! kept so that frames are placed and named after it unmaps a library or exits.
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// One line of `/proc/PID/maps` that maps a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    pub executable: bool,
    pub dev: String,
    pub inode: u64,
    /// The path as /proc/PID/maps shows it: as the process sees it in its own mount namespace,
    /// or from our root when that reaches it (see [`host_path`]).
    pub path: String,
}

/// Parses the text of `/proc/PID/maps`, keeping the file-backed mappings.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

/// Parses one `/proc/PID/maps` line; `None` for anonymous or malformed lines.
pub fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let inode: u64 = inode.parse().ok()?;
    if inode == 0 || !path.starts_with('/') || end <= start {
        return None;
    }
    Some(Mapping {
        start,
        end,
        offset: u64::from_str_radix(offset, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        dev: dev.to_string(),
        inode,
        path: path.strip_suffix(" (deleted)").unwrap_or(path).to_string(),
    })
}

/// Reads the file mappings of a live process.
pub fn read_maps(pid: u32) -> Result<Vec<Mapping>> {
    match fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(text) => Ok(parse_maps(&text)),
        Err(e) => Err(maps_error(pid, e)),
    }
}

/// Why `/proc/PID/maps` could not be read, in words.
fn maps_error(pid: u32, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoSuchProcess(pid),
        std::io::ErrorKind::PermissionDenied => Error::Permission(format!(
            "cannot read /proc/{pid}/maps: permission denied. Reading another process's \
             mappings takes the right to ptrace it: run as root with CAP_SYS_PTRACE (a \
             container may drop it), and check /proc's hidepid= option and \
             kernel.yama.ptrace_scope"
        )),
        _ => Error::io(format!("reading /proc/{pid}/maps"), e),
    }
}

/// A path from `pid`'s maps, reachable from here. The kernel writes those paths as seen from
/// the *reader's* root when it can: a process in another mount namespace (a container) shows
/// its own paths, reached through /proc/PID/root; a process chrooted inside ours shows the full
/// host path, which /proc/PID/root would prefix a second time; a process chrooted inside a
/// mount namespace of its own shows the path from that namespace's root, its own root's path
/// (/proc/PID/root, read the same way) in front.
pub fn host_path(pid: u32, path: &str) -> PathBuf {
    let through_root = PathBuf::from(format!("/proc/{pid}/root{path}"));
    if through_root.exists() {
        return through_root;
    }
    let chrooted = std::fs::read_link(format!("/proc/{pid}/root"))
        .ok()
        .filter(|root| root != Path::new("/"))
        .and_then(|root| {
            let inside = Path::new(path).strip_prefix(&root).ok()?;
            let p = PathBuf::from(format!("/proc/{pid}/root/{}", inside.display()));
            p.exists().then_some(p)
        });
    if let Some(p) = chrooted {
        return p;
    }
    if Path::new(path).exists() {
        return PathBuf::from(path);
    }
    through_root
}

/// What a re-read of a process's maps found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// The process is gone.
    Gone,
    /// The same mappings as last time: nothing to look at again.
    Same,
    Changed,
}

/// The file mappings a process had at any time while traced (newer ones win on overlap), with
/// the build-id of each file, read while the process could still show it.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    pub pid: u32,
    pub mappings: Vec<Mapping>,
    /// The mappings as last read (without those since unmapped).
    pub current: Vec<Mapping>,
    build_ids: HashMap<String, Option<String>>,
    segments: HashMap<String, Vec<Segment>>,
    /// `/proc/PID/maps` as last read: the same text is not parsed again.
    text: String,
}

impl ProcessMaps {
    pub fn new(pid: u32, mappings: Vec<Mapping>) -> ProcessMaps {
        let mut maps = ProcessMaps {
            pid,
            current: Vec::new(),
            mappings: Vec::new(),
            build_ids: HashMap::new(),
            segments: HashMap::new(),
            text: String::new(),
        };
        maps.add(mappings);
        maps
    }

    /// The code ranges of the objects at `paths` (as the process sees them), at any time.
    pub fn text_of(&self, paths: &[String]) -> Vec<(u64, u64)> {
        self.mappings
            .iter()
            .filter(|m| m.executable && paths.contains(&m.path))
            .map(|m| (m.start, m.end))
            .collect()
    }

    /// Re-reads `/proc/PID/maps`, keeping what was seen before.
    pub fn refresh(&mut self) -> Refresh {
        let Ok(text) = fs::read_to_string(format!("/proc/{}/maps", self.pid)) else {
            return Refresh::Gone;
        };
        if text == self.text {
            return Refresh::Same;
        }
        let current = parse_maps(&text);
        self.text = text;
        if current.is_empty() {
            return Refresh::Gone;
        }
        if current == self.current {
            return Refresh::Same;
        }
        self.add(current);
        Refresh::Changed
    }

    fn add(&mut self, current: Vec<Mapping>) {
        for m in &current {
            if !self.mappings.contains(m) {
                self.mappings.push(m.clone());
            }
            if m.executable && !self.build_ids.contains_key(&m.path) {
                let file = readable_path(self.pid, &m.path);
                let id = blazesym::helper::read_elf_build_id(&file)
                    .ok()
                    .flatten()
                    .map(|id| hex(&id));
                self.build_ids.insert(m.path.clone(), id);
                self.segments.insert(m.path.clone(), load_segments(&file));
            }
        }
        self.current = current;
    }

    /// The newest mapping that contains `addr`.
    pub fn lookup(&self, addr: u64) -> Option<&Mapping> {
        self.mappings
            .iter()
            .rev()
            .find(|m| m.start <= addr && addr < m.end)
    }

    /// The build-id of the file mapped at `path`, when it has one.
    pub fn build_id(&self, path: &str) -> Option<String> {
        self.build_ids.get(path).cloned().flatten()
    }

    /// The loadable segments of the file mapped at `path`, as read with its build-id.
    pub fn segments(&self, path: &str) -> Vec<Segment> {
        self.segments.get(path).cloned().unwrap_or_default()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the file a process mapped at `path` can be read now: through the process's root while
/// it lives (container-aware), else at its own path.
pub fn readable_path(pid: u32, path: &str) -> PathBuf {
    let through_root = host_path(pid, path);
    if through_root.exists() {
        through_root
    } else {
        PathBuf::from(path)
    }
}

/// An object file the stacks pass through.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Module {
    /// Path as the process saw it.
    pub path: String,
    /// GNU build-id, hex, when the file has one: which file (or debug file) names its frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// Its loadable segments, which place a file offset at the address its debug file gives
    /// (a separate debug file keeps the segments but not their file offsets): so that a
    /// capture is named from a debug file alone, on a machine without the object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<Segment>,
}

/// A loadable segment of an ELF file: its bytes in the file, and the address they have there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Segment {
    pub offset: u64,
    pub size: u64,
    pub vaddr: u64,
}

impl Segment {
    /// The address, as the ELF file gives it, of file offset `off`, by the segment holding it.
    pub fn vaddr_of(segments: &[Segment], off: u64) -> Option<u64> {
        segments
            .iter()
            .find(|s| (s.offset..s.offset.saturating_add(s.size)).contains(&off))
            .map(|s| s.vaddr.wrapping_add(off - s.offset))
    }
}

/// The loadable segments of the 64-bit ELF file at `path` (none when it is not one), read from
/// its program headers alone: the first bytes of the file, not all of it.
pub fn load_segments(path: &Path) -> Vec<Segment> {
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    use std::io::Read as _;
    const HEAD: u64 = 64 * 1024;
    let mut data = Vec::new();
    let read = fs::File::open(path).and_then(|f| f.take(HEAD).read_to_end(&mut data));
    if read.is_err() {
        return Vec::new();
    }
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(&*data) else {
        return Vec::new();
    };
    let Ok(endian) = header.endian() else {
        return Vec::new();
    };
    let Ok(headers) = header.program_headers(endian, &*data) else {
        return Vec::new();
    };
    headers
        .iter()
        .filter(|h| h.p_type(endian) == object::elf::PT_LOAD)
        .map(|h| Segment {
            offset: h.p_offset(endian),
            size: h.p_filesz(endian),
            vaddr: h.p_vaddr(endian),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary's segments: an offset inside one is at its address plus the distance
    /// into it, one outside all has no address, and a file that is not ELF has no segments.
    #[test]
    fn segments_place_file_offsets_at_their_addresses() {
        let exe = std::env::current_exe().unwrap();
        let segments = load_segments(&exe);
        assert!(segments.iter().any(|s| s.offset == 0), "{segments:?}");
        let code = segments.iter().find(|s| s.vaddr != 0).unwrap();
        let off = code.offset + code.size / 2;
        assert_eq!(
            Segment::vaddr_of(&segments, off),
            Some(code.vaddr + code.size / 2)
        );
        assert_eq!(Segment::vaddr_of(&segments, u64::MAX), None);
        assert!(load_segments(Path::new("/proc/self/status")).is_empty());
    }

    #[test]
    fn parses_maps_lines() {
        let text = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1234  /usr/bin/demo
55d0c0a02000-55d0c0a05000 r-xp 00002000 fe:01 1234  /usr/bin/demo
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7f1000000000-7f1000150000 r-xp 00028000 08:02 98765 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd0000000-7ffd0021000 rw-p 00000000 00:00 0                          [stack]
7f2000000000-7f2000001000 r-xp 00001000 08:02 555 /tmp/lib with space.so (deleted)
garbage line
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[1].start, 0x55d0c0a02000);
        assert_eq!(maps[1].offset, 0x2000);
        assert!(maps[1].executable);
        assert!(!maps[0].executable);
        assert_eq!(maps[2].path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(maps[3].path, "/tmp/lib with space.so");
    }

    #[test]
    fn newest_mapping_wins() {
        let m = |start, path: &str| Mapping {
            start,
            end: start + 0x1000,
            offset: 0,
            executable: true,
            dev: "0:0".into(),
            inode: 1,
            path: path.into(),
        };
        let maps = ProcessMaps::new(1, vec![m(0x1000, "/old.so"), m(0x1000, "/new.so")]);
        assert_eq!(maps.lookup(0x1800).unwrap().path, "/new.so");
        assert!(maps.lookup(0x2000).is_none());
    }

    #[test]
    fn unreadable_maps_say_why() {
        let e = maps_error(
            1,
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(e.exit_code(), crate::error::exit_code::PERMISSION);
        let line = e.to_string();
        assert!(
            line.contains("/proc/1/maps") && line.contains("CAP_SYS_PTRACE"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let e = maps_error(7, std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(e.to_string(), "no process with PID 7");
    }
}
