//! A program launched to be traced: resolved on `PATH`, forked and held before `exec` until the
//! probes are attached, and the places it is held again while unwind tables load
//! ([`hold_points`]).
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

use super::{allocators::Allocator, file_offset, map_file};
use crate::{
    error::{Error, Result},
    os::sudo_ids,
};

/// A place where a launched program is held (SIGSTOP from BPF) while the unwind tables of the
/// objects it has just mapped are loaded, before any code in them runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldPoint {
    pub object: PathBuf,
    /// A file offset in `object`.
    pub offset: u64,
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

/// A `#!` script (the way many services start): the interpreter the kernel runs it with, and
/// the programs the script names (`exec ./service --port 8080`), which it may run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    pub interpreter: PathBuf,
    pub runs: Vec<PathBuf>,
}

/// Whether `program` is a `#!` script; if so, its interpreter (resolved as the kernel and
/// `env` do) and the ELF programs it names: words with a `/` (relative to the current
/// directory or the script's own) and the word after `exec`.
pub fn script_of(program: &Path) -> Result<Option<Script>> {
    let bad = |reason: String| Error::Spawn {
        command: program.display().to_string(),
        reason,
    };
    // The head only: a program is usually an ELF binary, perhaps a large one.
    let mut head = Vec::new();
    fs::File::open(program)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .map_err(|e| bad(e.to_string()))?;
    if !head.starts_with(b"#!") {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let first = text.lines().next().unwrap_or_default();
    let mut words = first[2..].split_whitespace();
    let Some(mut interpreter) = words.next().map(PathBuf::from) else {
        return Err(bad("a script without an interpreter after #!".into()));
    };
    if interpreter.file_name().is_some_and(|n| n == "env") {
        let name = words
            .find(|w| !w.starts_with('-'))
            .ok_or_else(|| bad(format!("{first}: no program for env")))?;
        interpreter = resolve_program(&OsString::from(name))
            .map_err(|_| bad(format!("its interpreter {name} is not in PATH")))?;
    }
    if !is_elf(&interpreter) {
        return Err(bad(format!(
            "its interpreter {} is not an ELF executable",
            interpreter.display()
        )));
    }
    let dir = program.parent().unwrap_or(Path::new("."));
    let mut runs: Vec<PathBuf> = Vec::new();
    for line in text.lines().skip(1) {
        let line = line.split('#').next().unwrap_or_default();
        let words: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || ";&|()`\"'".contains(c))
            .filter(|w| !w.is_empty())
            .collect();
        for (i, w) in words.iter().enumerate() {
            let after_exec = i > 0 && words[i - 1] == "exec";
            let candidates: Vec<PathBuf> = if w.contains('/') {
                vec![PathBuf::from(w), dir.join(w)]
            } else if after_exec {
                resolve_program(&OsString::from(w)).into_iter().collect()
            } else {
                Vec::new()
            };
            if let Some(found) = candidates.into_iter().find(|c| is_elf(c)) {
                if !runs.contains(&found) && found != interpreter {
                    runs.push(found);
                }
            }
        }
    }
    Ok(Some(Script { interpreter, runs }))
}

/// An executable ELF file.
pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        && fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
        && magic == *b"\x7fELF"
}

/// A launched program, stopped just before `exec` until [`Launched::release`] is called.
pub struct Launched {
    pub pid: u32,
    gate: Option<fs::File>,
    status: Option<fs::File>,
}

impl Launched {
    /// Forks; the child waits for [`Launched::release`], then drops root back to the invoking
    /// user when run through sudo, and execs `argv` with this environment, `env` set on top.
    pub fn spawn(program: &Path, argv: &[OsString], env: &[(&str, OsString)]) -> Result<Launched> {
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
        // The environment, prepared before the fork (the child may not allocate).
        let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !env.iter().any(|(name, _)| k == name))
            .collect();
        vars.extend(env.iter().map(|(k, v)| (OsString::from(k), v.clone())));
        let c_env: Vec<CString> = vars
            .iter()
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        let mut c_envp: Vec<*const libc::c_char> = c_env.iter().map(|a| a.as_ptr()).collect();
        c_envp.push(std::ptr::null());
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
                libc::execve(c_program.as_ptr(), c_argv.as_ptr(), c_envp.as_ptr());
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
