//! The kernel's multi-uprobe links (`BPF_TRACE_UPROBE_MULTI`, Linux 6.6): every place of one
//! program in one object for one process in a single link. A perf-event uprobe detaches in a
//! grace period of its own (about 0.1 s here, one after another: the kernel serializes them
//! under its trace-event lock); a multi link detaches all its places in one, and links closed
//! at once share it.
//!
//! aya 0.14 loads uprobe programs without the expected attach type such a link needs, so the
//! programs that use them are loaded a second time here, from the same object relocated
//! against the maps aya created (they share every map and global), and linked with
//! `BPF_LINK_CREATE`.
use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{maps::Map, Ebpf};
use aya_obj::{btf::BtfFeatures, generated::bpf_insn, Object};

use crate::error::{Error, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

/// `union bpf_attr` for `BPF_BTF_LOAD`.
#[repr(C)]
#[derive(Default)]
struct BtfLoad {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` of a uprobe_multi link.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, correctly laid out prefix of `union bpf_attr`; the kernel
    // reads `size_of::<T>()` bytes of it and the pointers in it outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// The object's uprobe programs, relocated against the maps of a loaded [`Ebpf`] and loaded
/// for multi-uprobe links as they are first needed.
pub struct Programs {
    object: Object,
    /// The object's BTF, loaded: the verifier wants its function info with subprograms.
    btf: Option<OwnedFd>,
    loaded: HashMap<String, OwnedFd>,
}

impl Programs {
    /// Relocates `data` (the object `ebpf` was loaded from) against `ebpf`'s maps, and loads
    /// `probe` for multi links: an error means this kernel has no multi-uprobe links.
    pub fn new(ebpf: &Ebpf, data: &[u8], probe: &str) -> Result<Programs> {
        let err = |what: &str, e: &dyn std::fmt::Display| Error::Ebpf(format!("{what}: {e}"));
        let mut object = Object::parse(data).map_err(|e| err("parsing the eBPF object", &e))?;
        // Every BTF feature predates multi-uprobe links (Linux 6.6).
        let features = BtfFeatures::new(true, true, true, true, true, true, true, true);
        let btf = match object
            .fixup_and_sanitize_btf(&features)
            .map_err(|e| err("preparing the eBPF object's BTF", &e))?
        {
            Some(btf) => {
                let bytes = btf.to_bytes();
                let mut attr = BtfLoad {
                    btf: bytes.as_ptr() as u64,
                    btf_size: bytes.len() as u32,
                    ..BtfLoad::default()
                };
                Some(
                    bpf(BPF_BTF_LOAD, &mut attr)
                        .map_err(|e| err("loading the object's BTF", &e))?,
                )
            }
            None => None,
        };
        if let Ok(btf) = aya_obj::btf::Btf::from_sys_fs() {
            object
                .relocate_btf(&btf)
                .map_err(|e| err("relocating the eBPF object", &e))?;
        }
        let fds: HashMap<&str, i32> = ebpf
            .maps()
            .filter_map(|(name, map)| Some((name, map_fd(map)?)))
            .collect();
        let maps: Vec<(&str, i32, &aya_obj::Map)> = object
            .maps
            .iter()
            .filter_map(|(name, m)| Some((name.as_str(), *fds.get(name.as_str())?, m)))
            .collect();
        let text: HashSet<usize> = object.functions.keys().map(|(s, _)| *s).collect();
        // Relocation needs the object mutably and its maps immutably: relocate a copy.
        let mut relocated = object.clone();
        relocated
            .relocate_maps(maps.into_iter(), &text)
            .map_err(|e| err("relocating the eBPF object's maps", &e))?;
        relocated
            .relocate_calls(&text)
            .map_err(|e| err("relocating the eBPF object's calls", &e))?;
        let mut programs = Programs {
            object: relocated,
            btf,
            loaded: HashMap::new(),
        };
        programs.fd(probe)?;
        Ok(programs)
    }

    /// The program `name`, loaded once.
    fn fd(&mut self, name: &str) -> Result<BorrowedFd<'_>> {
        if !self.loaded.contains_key(name) {
            let fd = self.load(name)?;
            self.loaded.insert(name.to_string(), fd);
        }
        Ok(self.loaded[name].as_fd())
    }

    fn load(&self, name: &str) -> Result<OwnedFd> {
        let program = self
            .object
            .programs
            .get(name)
            .ok_or_else(|| Error::Ebpf(format!("program {name} missing from the object")))?;
        let function = self
            .object
            .functions
            .get(&program.function_key())
            .ok_or_else(|| Error::Ebpf(format!("program {name} has no code in the object")))?;
        let insns: &[bpf_insn] = &function.instructions;
        let license = CString::new("GPL").expect("no NUL");
        let mut prog_name = [0u8; 16];
        for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let func_info = function.func_info.func_info_bytes();
        let line_info = function.line_info.line_info_bytes();
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_KPROBE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type: BPF_TRACE_UPROBE_MULTI,
            ..ProgLoad::default()
        };
        if let Some(btf) = &self.btf {
            attr.prog_btf_fd = btf.as_raw_fd() as u32;
            attr.func_info_rec_size = function.func_info_rec_size as u32;
            attr.func_info = func_info.as_ptr() as u64;
            attr.func_info_cnt = function.func_info.func_info.len() as u32;
            attr.line_info_rec_size = function.line_info_rec_size as u32;
            attr.line_info = line_info.as_ptr() as u64;
            attr.line_info_cnt = function.line_info.line_info.len() as u32;
        }
        // The verifier gives up with EAGAIN when a signal arrives meanwhile (a Ctrl-C being
        // handled): load again.
        let mut tries = 0;
        let first = loop {
            match bpf(BPF_PROG_LOAD, &mut attr) {
                Ok(fd) => return Ok(fd),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 5 => tries += 1,
                Err(e) => break e,
            }
        };
        // Again with the verifier's log, to say why.
        let mut log = vec![0u8; 1 << 20];
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
        let _ = bpf(BPF_PROG_LOAD, &mut attr);
        let text = String::from_utf8_lossy(&log);
        let why: Vec<&str> = text
            .trim_end_matches('\0')
            .lines()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take(3)
            .collect();
        Err(Error::Ebpf(format!(
            "loading {name} for multi-uprobe links: {first}{}",
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join(" / "))
            }
        )))
    }

    /// Attaches `name` at `offsets` (file offsets) of the object at `path`, each with its
    /// cookie, for process `pid` only: one link. `semaphores`, when not empty, are the file
    /// offsets of each place's USDT semaphore (0: none), which the kernel raises in the
    /// process while the link lives and lowers when it closes, however the tracer ends.
    pub fn attach(
        &mut self,
        name: &str,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
        semaphores: &[u64],
        pid: u32,
    ) -> Result<OwnedFd> {
        assert_eq!(offsets.len(), cookies.len());
        assert!(semaphores.is_empty() || semaphores.len() == offsets.len());
        let ret = super::is_return(name);
        let prog_fd = self.fd(name)?.as_raw_fd() as u32;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Usage(format!("{}: NUL in path", path.display())))?;
        let mut attr = LinkCreate {
            prog_fd,
            attach_type: BPF_TRACE_UPROBE_MULTI,
            path: c_path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            cookies: cookies.as_ptr() as u64,
            ref_ctr_offsets: if semaphores.is_empty() {
                0
            } else {
                semaphores.as_ptr() as u64
            },
            cnt: offsets.len() as u32,
            multi_flags: if ret { BPF_F_UPROBE_MULTI_RETURN } else { 0 },
            pid,
            ..LinkCreate::default()
        };
        bpf(BPF_LINK_CREATE, &mut attr).map_err(|e| {
            if e.raw_os_error() == Some(libc::ESRCH) {
                Error::ExitedBeforeAttach(pid)
            } else {
                Error::Ebpf(format!(
                    "attaching {name} to {} at {offsets:x?}: {e}",
                    path.display()
                ))
            }
        })
    }

    /// The programs loaded here, for their run statistics.
    pub fn loaded(&self) -> impl Iterator<Item = (&str, BorrowedFd<'_>)> {
        self.loaded.iter().map(|(n, fd)| (n.as_str(), fd.as_fd()))
    }
}

/// The file descriptor of a map of the kinds the object defines.
fn map_fd(map: &Map) -> Option<i32> {
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::RingBuf(d)
        | Map::Unsupported(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}
