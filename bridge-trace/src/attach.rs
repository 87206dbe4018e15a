//! Loads the eBPF object, sets its read-only knobs and map sizes, and attaches every probe from
//! one declarative table ([`PROBES`]) to the allocator object of one process. Dropping the
//! [`Tracer`] detaches everything; the links are file descriptors, so the kernel also detaches
//! them if bridge-trace is killed.
use std::{num::NonZeroU32, os::fd::AsFd as _, path::Path};

use aya::{
    programs::{uprobe::UProbeScope, ProgramError, UProbe},
    Ebpf, EbpfLoader,
};

use bridge_trace_common::UnwindMode;

use crate::{
    error::{Error, Result},
    target::{self, Allocator},
};

/// The eBPF object built by build.rs from `bridge-trace-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bridge-trace"));

/// One probe: an eBPF program attached to an allocator symbol.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub program: &'static str,
    pub symbol: &'static str,
    /// Without it nothing sensible can be traced (malloc and free).
    pub required: bool,
}

const fn probe(program: &'static str, symbol: &'static str, required: bool) -> Probe {
    Probe {
        program,
        symbol,
        required,
    }
}

/// Every probe bridge-trace attaches, in attach order. Entry programs read the arguments and
/// capture the stack; `alloc_return` (one program for all allocation functions) records the
/// result. Each return probe is attached before its entry probe, so that no call is seen
/// entering without being seen returning.
pub const PROBES: &[Probe] = &[
    probe("alloc_return", "malloc", true),
    probe("malloc_enter", "malloc", true),
    probe("alloc_return", "calloc", false),
    probe("calloc_enter", "calloc", false),
    probe("alloc_return", "realloc", false),
    probe("realloc_enter", "realloc", false),
    probe("alloc_return", "reallocarray", false),
    probe("reallocarray_enter", "reallocarray", false),
    probe("alloc_return", "posix_memalign", false),
    probe("posix_memalign_enter", "posix_memalign", false),
    probe("alloc_return", "aligned_alloc", false),
    probe("aligned_alloc_enter", "aligned_alloc", false),
    probe("alloc_return", "memalign", false),
    probe("memalign_enter", "memalign", false),
    probe("alloc_return", "valloc", false),
    probe("valloc_enter", "valloc", false),
    probe("alloc_return", "pvalloc", false),
    probe("pvalloc_enter", "pvalloc", false),
    probe("free_enter", "free", true),
    probe("exit_enter", "_exit", false),
];

/// Knobs of the eBPF object, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    pub tgid: u32,
    /// Launched targets: hold them at `_exit` (to read their maps) and at their entry point
    /// (to load unwind tables before their code runs).
    pub launched: bool,
    pub max_allocs: u32,
    pub unwind: UnwindMode,
}

/// The loaded and attached eBPF object. Maps are read through [`crate::collect`].
pub struct Tracer {
    pub(crate) ebpf: Ebpf,
    /// Symbols actually probed (an alias shows as `alias=symbol`).
    pub attached: Vec<String>,
}

/// Fails with a clear message when the process lacks the privileges to trace.
pub fn check_privileges() -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_PERFMON: u64 = 38;
    const CAP_BPF: u64 = 39;
    if eff & (1 << CAP_SYS_ADMIN) != 0 {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Permission(format!(
        "not permitted to trace: run as root (sudo bridge-trace ...) or grant {}",
        missing.join(" and ")
    )))
}

fn ebpf_err(what: &str, e: impl std::fmt::Display) -> Error {
    let msg = e.to_string();
    if msg.contains("Operation not permitted") || msg.contains("EPERM") {
        return Error::Permission(format!(
            "{what}: operation not permitted (run as root or grant CAP_BPF and CAP_PERFMON)"
        ));
    }
    Error::Ebpf(format!("{what}: {msg}"))
}

/// Walks a source chain into one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Tracer {
    /// Loads the object and attaches every probe of [`PROBES`] that the allocator exports.
    pub fn attach(allocator: &Allocator, knobs: Knobs) -> Result<Tracer> {
        check_privileges()?;
        let launched = u32::from(knobs.launched);
        let unwind = knobs.unwind as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global("TARGET_TGID", &knobs.tgid, true)
            .override_global("STOP_AT_EXIT", &launched, true)
            .override_global("STOP_AT_START", &launched, true)
            .override_global("UNWIND_MODE", &unwind, true)
            .map_max_entries("ALLOCS", knobs.max_allocs)
            .load(EBPF_OBJECT)
            .map_err(|e| ebpf_err("loading the eBPF object", chain(&e)))?;
        let pid =
            NonZeroU32::new(knobs.tgid).ok_or_else(|| Error::Usage("cannot trace pid 0".into()))?;
        let mut attached: Vec<String> = Vec::new();
        for p in PROBES {
            if !allocator.symbols.iter().any(|s| s == p.symbol) {
                if p.required {
                    return Err(Error::NoAllocator {
                        pid: knobs.tgid,
                        searched: format!("{} (no `{}` symbol)", allocator.path, p.symbol),
                    });
                }
                continue;
            }
            attach_one(&mut ebpf, p, &allocator.host_path, pid)?;
            if !attached.iter().any(|a| a == p.symbol) {
                attached.push(p.symbol.to_string());
            }
        }
        for (alias, target) in &allocator.aliases {
            if attached.iter().any(|a| a == target) {
                attached.push(format!("{alias}={target}"));
            }
        }
        Ok(Tracer { ebpf, attached })
    }

    /// Attaches `start_enter` wherever a launched program is to be held while unwind tables
    /// load ([`target::hold_points`]). Without any, tables load at the next look at the maps.
    pub fn attach_holds(&mut self, program: &Path, allocator: &Allocator, pid: u32) -> Result<()> {
        let pid = NonZeroU32::new(pid).ok_or_else(|| Error::Usage("cannot trace pid 0".into()))?;
        let label = "start_enter";
        let prog = loaded_uprobe(&mut self.ebpf, label)?;
        for point in target::hold_points(program, allocator) {
            prog.attach(point.offset, &point.object, UProbeScope::OneProcess(pid))
                .map_err(|e| {
                    ebpf_err(
                        &format!("attaching {label} to {}", point.object.display()),
                        chain(&e),
                    )
                })?;
        }
        Ok(())
    }

    /// What each loaded program cost so far, from the kernel's own statistics (run time is
    /// counted only while `kernel.bpf_stats_enabled` is 1).
    pub fn program_costs(&self) -> Vec<ProgramCost> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let fd = p.fd().ok()?;
                let Some(info) = prog_info(fd.as_fd()) else {
                    tracing::debug!(program = name, "could not read bpf_prog_info");
                    return None;
                };
                Some(ProgramCost {
                    program: name.to_string(),
                    runs: info.run_cnt,
                    run_time_ns: info.run_time_ns,
                    missed_runs: info.recursion_misses,
                })
            })
            .collect()
    }
}

/// One eBPF program's cost, as the kernel counted it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    /// Total run time; 0 unless `kernel.bpf_stats_enabled` was 1 while tracing.
    pub run_time_ns: u64,
    pub missed_runs: u64,
}

/// `bpf_prog_info` of a loaded program (BPF_OBJ_GET_INFO_BY_FD).
fn prog_info(fd: std::os::fd::BorrowedFd<'_>) -> Option<aya_obj::generated::bpf_prog_info> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: bpf_prog_info is plain old data; all zeroes is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: &mut info as *mut _ as u64,
    };
    // SAFETY: the attribute points at a live, correctly sized out-struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoByFd,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    (r == 0).then_some(info)
}

/// The uprobe program `name` of the object, loaded into the kernel (once).
fn loaded_uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe> {
    let program: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Ebpf(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e: ProgramError| ebpf_err(name, chain(&e)))?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|e| ebpf_err(&format!("loading {name}"), chain(&e)))?;
    }
    Ok(program)
}

fn attach_one(ebpf: &mut Ebpf, p: &Probe, object: &Path, pid: NonZeroU32) -> Result<()> {
    let program = loaded_uprobe(ebpf, p.program)?;
    program
        .attach(p.symbol, object, UProbeScope::OneProcess(pid))
        .map_err(|e| {
            let msg = chain(&e);
            if msg.contains("No such process") || msg.contains("ESRCH") {
                Error::ExitedBeforeAttach(pid.get())
            } else {
                ebpf_err(
                    &format!(
                        "attaching {} to {}:{}",
                        p.program,
                        object.display(),
                        p.symbol
                    ),
                    msg,
                )
            }
        })?;
    Ok(())
}
