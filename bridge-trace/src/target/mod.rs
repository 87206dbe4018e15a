//! The traced process: find it (or launch it, [`launch`]), read its memory maps, and locate
//! the allocators it actually maps ([`allocators`]), through `/proc/PID/root` so that a
//! process in a container works.
mod allocators;
pub mod cgroup;
pub mod inject;
mod launch;
pub mod sampler;
pub mod usdt;

use std::{
    fs,
    path::{Path, PathBuf},
};

use allocators::is_libc_name;
pub use allocators::{
    allocator_symbols, allocators_for_command, allocators_of, custom_allocators, describe,
    find_allocators, hold_allocator, libc_allocator, program_objects, Allocator, EntryKind,
    FoundSymbols, ENTRY_POINTS, PREFIXES,
};
pub use launch::{hold_points, is_elf, resolve_program, script_of, HoldPoint, Launched, Script};

use object::Object as _;

use crate::{
    error::{Error, Result},
    model::maps::{host_path, read_maps, Mapping},
};

/// Where the byte at virtual address `addr` of an ELF object is in its file.
pub(crate) fn file_offset(elf: &object::File<'_>, addr: u64) -> Option<u64> {
    use object::ObjectSegment as _;
    elf.segments().find_map(|s| {
        let (off, size) = s.file_range();
        let start = s.address();
        (addr >= start && addr < start + size).then(|| off + (addr - start))
    })
}

fn map_file(path: &Path) -> Option<memmap2::Mmap> {
    let file = fs::File::open(path).ok()?;
    // SAFETY: a read-only mapping of a binary, read once, right now.
    unsafe { memmap2::Mmap::map(&file) }.ok()
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
/// The resident set of `pid` in bytes (`/proc/PID/statm`), `None` once it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: plain libc call.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    Some(pages * page)
}

/// The suppressions a program declares itself: the string its `__lsan_default_suppressions`
/// returns (LeakSanitizer's hook), read from the executable without running it: the
/// function's first instructions load the string's address into the return register.
pub fn declared_suppressions(exe: &Path) -> Option<String> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    use object::ObjectSymbol as _;
    let map = map_file(exe)?;
    let elf = object::File::parse(&*map).ok()?;
    let sym = elf
        .symbols()
        .chain(elf.dynamic_symbols())
        .find(|s| s.name() == Ok("__lsan_default_suppressions") && s.address() != 0)?;
    let start = file_offset(&elf, sym.address())? as usize;
    let code = map.get(start..(start + 64).min(map.len()))?;
    let mut decoder = Decoder::with_ip(64, code, sym.address(), DecoderOptions::NONE);
    for ins in decoder.iter().take(16) {
        let to_rax = matches!(ins.op0_register(), Register::RAX | Register::EAX);
        let address = match ins.mnemonic() {
            Mnemonic::Ret => return None,
            Mnemonic::Lea if to_rax && ins.is_ip_rel_memory_operand() => {
                ins.ip_rel_memory_address()
            }
            Mnemonic::Mov if to_rax && matches!(ins.op1_kind(), OpKind::Immediate32) => {
                ins.immediate(1)
            }
            _ => continue,
        };
        let at = file_offset(&elf, address)? as usize;
        let text = map.get(at..)?;
        let end = text.iter().take(1 << 16).position(|&b| b == 0)?;
        return String::from_utf8(text[..end].to_vec()).ok();
    }
    None
}

pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// Go manages its own heap (runtime.mallocgc, a garbage collector): there is no malloc to
/// trace, and return probes can crash Go programs (their stacks move).
pub fn refuse_go(exe: &Path) -> Result<()> {
    let Some(data) = map_file(exe) else {
        return Ok(());
    };
    let Ok(obj) = object::File::parse(&*data) else {
        return Ok(());
    };
    let go = obj.section_by_name(".go.buildinfo").is_some()
        || obj.section_by_name(".gopclntab").is_some()
        || obj.section_by_name(".note.go.buildid").is_some();
    if go {
        return Err(Error::GoProgram(exe.display().to_string()));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pid() {
        assert!(matches!(
            inspect_pid(u32::MAX - 1),
            Err(Error::NoSuchProcess(_))
        ));
    }
}
