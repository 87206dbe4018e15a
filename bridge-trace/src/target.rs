//! The traced process: find it (or launch it, held before `exec` until the probes are attached),
//! read its memory maps, and locate the allocator object it actually maps, through
//! `/proc/PID/root` so that a process in a container works.
use std::{
    ffi::{CString, OsString},
    fs,
    io::{Read as _, Write as _},
    os::unix::{
        ffi::OsStrExt as _,
        fs::MetadataExt as _,
        io::{FromRawFd as _, OwnedFd},
    },
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use crate::error::{Error, Result};

/// One line of `/proc/PID/maps` that maps a file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// A place where a launched program is held (SIGSTOP from BPF) while the unwind tables of the
/// objects it has just mapped are loaded, before any code in them runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldPoint {
    pub object: PathBuf,
    /// A file offset in `object`.
    pub offset: u64,
}

fn map_file(path: &Path) -> Option<memmap2::Mmap> {
    let file = fs::File::open(path).ok()?;
    // SAFETY: a read-only mapping of a binary, read once, right now.
    unsafe { memmap2::Mmap::map(&file) }.ok()
}

/// The entry of the dynamic symbol `name` of `object`.
fn symbol_point(object: &Path, name: &str) -> Option<HoldPoint> {
    let data = map_file(object)?;
    let elf = object::File::parse(&*data).ok()?;
    let sym = elf.dynamic_symbols().find(|s| s.name() == Ok(name))?;
    file_offset(&elf, sym.address()).map(|offset| HoldPoint {
        object: object.to_path_buf(),
        offset,
    })
}

/// Where a launched program is held: glibc's `__libc_early_init`, which the dynamic loader
/// calls once every library is mapped and before their constructors run, and the loader's
/// `_dl_debug_state` (the hook debuggers use), which it calls whenever `dlopen` or `dlclose`
/// changed the set of objects; for a static program, its entry point (`e_entry`). Empty for
/// anything else (a script, say).
pub fn hold_points(program: &Path, allocator: &Allocator) -> Vec<HoldPoint> {
    if allocator.host_path == program {
        let Some(data) = map_file(program) else {
            return Vec::new();
        };
        let Ok(elf) = object::File::parse(&*data) else {
            return Vec::new();
        };
        return file_offset(&elf, elf.entry())
            .map(|offset| HoldPoint {
                object: program.to_path_buf(),
                offset,
            })
            .into_iter()
            .collect();
    }
    let interpreter = map_file(program).and_then(|data| {
        let elf = object::File::parse(&*data).ok()?;
        let interp = elf.section_by_name(".interp")?.data().ok()?;
        let interp = interp.split(|&b| b == 0).next()?;
        Some(PathBuf::from(std::str::from_utf8(interp).ok()?))
    });
    [
        symbol_point(&allocator.host_path, "__libc_early_init"),
        interpreter.and_then(|ld| symbol_point(&ld, "_dl_debug_state")),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn file_offset(elf: &object::File<'_>, addr: u64) -> Option<u64> {
    use object::ObjectSegment as _;
    elf.segments().find_map(|s| {
        let (off, size) = s.file_range();
        let start = s.address();
        (addr >= start && addr < start + size).then(|| off + (addr - start))
    })
}

/// The processes running `exe` (a canonical path), lowest pid first. A process whose file was
/// replaced since it started (an upgrade: `exe (deleted)`) still counts.
pub fn processes_of(exe: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| {
                let p = p.to_string_lossy();
                p == exe.to_string_lossy()
                    || p.strip_suffix(" (deleted)") == Some(&*exe.to_string_lossy())
            })
        })
        .collect();
    pids.sort_unstable();
    pids
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NoSuchProcess(pid)),
        Err(e) => Err(Error::io(format!("reading /proc/{pid}/maps"), e)),
    }
}

/// A path from `pid`'s maps, reachable from here. The kernel writes those paths as seen from
/// the *reader's* root when it can: a process in another mount namespace (a container) shows
/// its own paths, reached through /proc/PID/root; a process chrooted inside ours shows the full
/// host path, which /proc/PID/root would prefix a second time.
pub fn host_path(pid: u32, path: &str) -> PathBuf {
    let through_root = PathBuf::from(format!("/proc/{pid}/root{path}"));
    if !through_root.exists() && Path::new(path).exists() {
        return PathBuf::from(path);
    }
    through_root
}

/// Is `pid` a live process?
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The executable of a process, as it sees it (`/proc/PID/exe`).
pub fn exe(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The process's short name (comm).
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// An object file (libc, or the executable itself when it links its allocator statically) that
/// exports the allocator's entry points.
#[derive(Clone, Debug)]
pub struct Allocator {
    /// The path as seen by the process.
    pub path: String,
    /// The same file, reachable from here (through /proc/PID/root when the process is known).
    pub host_path: PathBuf,
    /// Entry points this object exports, by name, aliases left out.
    pub symbols: Vec<String>,
    /// (alias, the entry point it is): traced through the latter's probes.
    pub aliases: Vec<(String, String)>,
}

/// Every allocator entry point bridge-trace probes, plus `_exit`.
pub const ALLOCATOR_SYMBOLS: [&str; 11] = [
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "free",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "_exit",
];

impl Allocator {
    /// The allocator in the object at `path` (as the process sees it), read through
    /// `host_path`: `None` unless it defines both `malloc` and `free`.
    fn from_object(path: String, host_path: PathBuf) -> Option<Allocator> {
        let (symbols, aliases) = allocator_symbols(&host_path);
        let defines = |name: &str| symbols.iter().any(|s| s == name);
        (defines("malloc") && defines("free")).then_some(Allocator {
            path,
            host_path,
            symbols,
            aliases,
        })
    }
}

/// The `ALLOCATOR_SYMBOLS` that `file` defines (dynamic or static symbol table), in table
/// order, without aliases; and the
/// aliases as (alias, symbol it aliases). glibc's `aligned_alloc` is `memalign`: probing both
/// would run two programs on every call.
pub fn allocator_symbols(file: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let Ok(data) = fs::read(file) else {
        return (Vec::new(), Vec::new());
    };
    let Ok(obj) = object::File::parse(&*data) else {
        return (Vec::new(), Vec::new());
    };
    let mut addresses: Vec<(usize, u64)> = obj
        .dynamic_symbols()
        .chain(obj.symbols())
        .filter(|s| s.is_definition())
        .filter_map(|s| {
            let n = s.name().ok()?;
            // Versioned dynamic names look like "malloc@@GLIBC_2.2.5".
            let base = n.split('@').next().unwrap_or(n);
            let index = ALLOCATOR_SYMBOLS.iter().position(|s| *s == base)?;
            Some((index, s.address()))
        })
        .collect();
    addresses.sort();
    addresses.dedup_by_key(|(index, _)| *index);
    let mut symbols = Vec::new();
    let mut aliases = Vec::new();
    for (k, &(index, addr)) in addresses.iter().enumerate() {
        let name = ALLOCATOR_SYMBOLS[index].to_string();
        match addresses[..k].iter().find(|(_, a)| *a == addr) {
            Some(&(first, _)) => aliases.push((name, ALLOCATOR_SYMBOLS[first].to_string())),
            None => symbols.push(name),
        }
    }
    (symbols, aliases)
}

fn is_libc_name(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base == "libc.so.6" || base == "libc.so" || (base.starts_with("libc-") && base.ends_with(".so"))
}

/// Finds the allocator a process maps: its libc, or else its executable if that defines
/// `malloc` and `free` itself (a statically linked allocator).
pub fn find_allocator(pid: u32, maps: &[Mapping]) -> Result<Allocator> {
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let mut candidates: Vec<&str> = Vec::new();
    for m in maps {
        if is_libc_name(&m.path) && !candidates.contains(&m.path.as_str()) {
            candidates.push(&m.path);
        }
    }
    if let Some(exe) = &exe {
        if let Some(m) = maps.iter().find(|m| &m.path == exe) {
            candidates.push(&m.path);
        }
    }
    for path in &candidates {
        if let Some(allocator) = Allocator::from_object(path.to_string(), host_path(pid, path)) {
            return Ok(allocator);
        }
    }
    let searched = if candidates.is_empty() {
        format!("{} mapped objects (no libc among them)", maps.len())
    } else {
        candidates.join(", ")
    };
    Err(Error::NoAllocator { pid, searched })
}

/// The thread ids of process `pid` (empty once it is gone).
pub fn threads(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The object holding `pid`'s heap-growth wrappers (brk, mmap, munmap, mremap): its libc, or
/// the executable itself when it is statically linked; reachable from here.
pub fn growth_object(pid: u32, maps: &[Mapping]) -> Option<PathBuf> {
    let path = maps
        .iter()
        .find(|m| is_libc_name(&m.path))
        .map(|m| m.path.clone())
        .or_else(|| {
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let exe = exe.to_string_lossy().into_owned();
            maps.iter().any(|m| m.path == exe).then_some(exe)
        })?;
    Some(host_path(pid, &path))
}

/// Checks that `pid` can be traced and returns its maps.
pub fn inspect_pid(pid: u32) -> Result<Vec<Mapping>> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(Error::NoSuchProcess(pid));
    }
    let maps = read_maps(pid)?;
    if maps.is_empty() {
        // Kernel threads have an empty maps file; so does a process that is exiting.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let flags: u64 = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(6))
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        const PF_KTHREAD: u64 = 0x0020_0000;
        if flags & PF_KTHREAD != 0 {
            return Err(Error::KernelThread(pid));
        }
        return Err(Error::ExitedBeforeAttach(pid));
    }
    Ok(maps)
}

/// Where the allocator of a program about to be launched lives. The program is not running yet,
/// so this follows what the dynamic loader will do: a dynamically linked program on this host
/// maps the same libc as bridge-trace itself; a static one carries its allocator.
pub fn allocator_for_command(program: &Path) -> Result<Allocator> {
    let data = fs::read(program).map_err(|e| Error::Spawn {
        command: program.display().to_string(),
        reason: e.to_string(),
    })?;
    let obj = object::File::parse(&*data).map_err(|_| Error::Spawn {
        command: program.display().to_string(),
        reason: "not an ELF executable".into(),
    })?;
    let dynamic = obj.section_by_name(".interp").is_some();
    drop(obj);
    if !dynamic {
        return Allocator::from_object(program.display().to_string(), program.to_path_buf())
            .ok_or_else(|| Error::NoAllocator {
                pid: 0,
                searched: format!(
                    "{} (statically linked, no malloc/free symbols)",
                    program.display()
                ),
            });
    }
    let own = read_maps(std::process::id())?;
    let libc = own
        .iter()
        .find(|m| is_libc_name(&m.path))
        .ok_or_else(|| Error::NoAllocator {
            pid: 0,
            searched: "bridge-trace's own maps (no libc)".into(),
        })?;
    Allocator::from_object(libc.path.clone(), PathBuf::from(&libc.path)).ok_or_else(|| {
        Error::NoAllocator {
            pid: 0,
            searched: format!("{} (no malloc/free symbols)", libc.path),
        }
    })
}

/// Resolves a program name the way `execvp` does.
pub fn resolve_program(program: &OsString) -> Result<PathBuf> {
    let p = Path::new(program);
    let not_found = |reason: &str| Error::Spawn {
        command: p.display().to_string(),
        reason: reason.to_string(),
    };
    if p.as_os_str().as_bytes().contains(&b'/') {
        if !p.is_file() {
            return Err(not_found("no such file"));
        }
        return Ok(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(p);
        if let Ok(md) = fs::metadata(&candidate) {
            if md.is_file() && md.mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(not_found("command not found in PATH"))
}

/// A launched program, stopped just before `exec` until [`Launched::release`] is called.
pub struct Launched {
    pub pid: u32,
    gate: Option<fs::File>,
    status: Option<fs::File>,
}

impl Launched {
    /// Forks; the child waits for [`Launched::release`], then drops root back to the invoking
    /// user when run through sudo, and execs `argv`.
    pub fn spawn(program: &Path, argv: &[OsString]) -> Result<Launched> {
        let spawn_err = |reason: String| Error::Spawn {
            command: program.display().to_string(),
            reason,
        };
        let c_program = CString::new(program.as_os_str().as_bytes())
            .map_err(|_| spawn_err("NUL byte in program path".into()))?;
        let c_args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| spawn_err("NUL byte in an argument".into()))?;
        let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
        c_argv.push(std::ptr::null());
        let drop_to = sudo_ids();

        let (gate_r, gate_w) = pipe().map_err(|e| spawn_err(e.to_string()))?;
        let (status_r, status_w) = pipe().map_err(|e| spawn_err(e.to_string()))?;
        // SAFETY: the child only calls async-signal-safe functions before exec or _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(spawn_err(std::io::Error::last_os_error().to_string()));
        }
        if pid == 0 {
            // Child.
            // SAFETY: async-signal-safe calls only; every path ends in exec or _exit.
            unsafe {
                use std::os::fd::AsRawFd as _;
                libc::close(gate_w.as_raw_fd());
                libc::close(status_r.as_raw_fd());
                let mut b = [0u8; 1];
                if libc::read(gate_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) != 1 {
                    libc::_exit(127);
                }
                libc::fcntl(status_w.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
                if let Some((uid, gid)) = drop_to {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        let errno = *libc::__errno_location();
                        libc::write(status_w.as_raw_fd(), (&errno as *const i32).cast(), 4);
                        libc::_exit(127);
                    }
                }
                libc::execv(c_program.as_ptr(), c_argv.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(status_w.as_raw_fd(), (&errno as *const i32).cast(), 4);
                libc::_exit(127);
            }
        }
        drop(gate_r);
        drop(status_w);
        Ok(Launched {
            pid: pid as u32,
            gate: Some(fs::File::from(gate_w)),
            status: Some(fs::File::from(status_r)),
        })
    }

    /// Lets the child exec; returns the exec error, if any.
    pub fn release(&mut self) -> Result<()> {
        if let Some(mut gate) = self.gate.take() {
            let _ = gate.write_all(&[1]);
        }
        let mut buf = Vec::new();
        if let Some(mut status) = self.status.take() {
            let _ = status.read_to_end(&mut buf);
        }
        if buf.len() >= 4 {
            let errno = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            return Err(Error::Spawn {
                command: format!("pid {}", self.pid),
                reason: std::io::Error::from_raw_os_error(errno).to_string(),
            });
        }
        Ok(())
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        // Closing the gate unreleased makes the child _exit(127) instead of running.
        self.gate.take();
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: plain syscall with a valid out-array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The invoking user's ids when bridge-trace runs as root through sudo.
pub(crate) fn sudo_ids() -> Option<(libc::uid_t, libc::gid_t)> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let uid = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    if uid == 0 {
        return None;
    }
    Some((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(is_libc_name(&maps[2].path));
    }

    #[test]
    fn finds_own_libc() {
        let pid = std::process::id();
        let maps = read_maps(pid).unwrap();
        let a = find_allocator(pid, &maps).unwrap();
        assert!(a.path.contains("libc"), "{a:?}");
        for s in [
            "malloc",
            "free",
            "calloc",
            "realloc",
            "posix_memalign",
            "_exit",
        ] {
            assert!(
                a.symbols.iter().any(|x| x == s),
                "{s} missing from {:?}",
                a.symbols
            );
        }
    }

    #[test]
    fn missing_pid() {
        assert!(matches!(
            inspect_pid(u32::MAX - 1),
            Err(Error::NoSuchProcess(_))
        ));
    }
}
