//! Loads the eBPF object, sets its read-only knobs and map sizes, and attaches the probes of
//! every allocator object of each traced process, from one declarative table of entry points
//! ([`target::ENTRY_POINTS`], each kind read by one program: [`entry_program`]), and the
//! system-wide tracepoints ([`GROWTH_TRACEPOINT`], [`EXEC_TRACEPOINT`], and with
//! `--follow-children` [`NEWTASK_TRACEPOINT`] and [`CHILD_FAULT_TRACEPOINT`]); or, for a
//! process that carries the `otel_memory` contract, the probes at its sites ([`usdt`], the
//! semaphores raised through the links' reference counters). Owns the
//! user-written control maps (TARGETS, CONFIG, EXP_TABLE, USDT_SPECS; HELD_CHILDREN's removals) and purges
//! a process's entries from the other maps once it is no longer traced. Uprobes are attached
//! as multi-uprobe links ([`multi`]: one per program, object and process) where the kernel
//! has them, as aya's perf-event uprobes otherwise. Dropping the [`Tracer`] detaches
//! everything; the links are file descriptors, so the kernel also detaches them if
//! bridge-trace is killed.
use std::{
    collections::HashMap,
    num::NonZeroU32,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

mod calibrate;
mod multi;
pub mod placement;
mod probes;
mod usdt;

use placement::Reads;
use probes::static_reads;

pub use calibrate::ProbeCosts;

pub use probes::{
    allocator_probes, entry_program, floor_probes, AllocProbe, FloorParts, Place, Probe,
    CHILD_FAULT_TRACEPOINT, EXEC_TRACEPOINT, GROWTH_PROBES, GROWTH_TRACEPOINT, NEWTASK_TRACEPOINT,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuHashMap},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeLinkId, UProbeScope},
        ProgramError, RawTracePoint, TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};

use bridge_trace_common::names::{global, map, program};
use bridge_trace_common::{
    config, AllocInfo, AllocKey, GrowthTotals, InFlight, MmapRegion, StackKey, StackTotals,
    TextRanges, UnwindMode, EXP_QUANTILES, EXP_QUANTILE_SHIFT, MAX_SAMPLE_INTERVAL,
};

use crate::{
    error::{Error, Result},
    model::meta::ProgramCost,
    target::{self, Allocator},
};

/// Program `$name` of the object as a `$kind` (UProbe, TracePoint, RawTracePoint), loaded
/// into the kernel on first use.
macro_rules! loaded {
    ($ebpf:expr, $name:expr, $kind:ty) => {{
        let name: &str = $name;
        let program: &mut $kind = $ebpf
            .program_mut(name)
            .ok_or_else(|| Error::Ebpf(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|e: ProgramError| ebpf_err(name, chain(&e)))?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|e| ebpf_err(&format!("loading {name}"), chain(&e)))?;
        }
        program
    }};
}

/// The eBPF object built by build.rs from `bridge-trace-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bridge-trace"));

/// Knobs of the eBPF object, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// The first process traced.
    pub tgid: u32,
    /// Launched targets: hold them at `_exit` (to read their maps) and at their entry point
    /// (to load unwind tables before their code runs).
    pub launched: bool,
    pub max_allocs: u32,
    pub unwind: UnwindMode,
    /// Follow the processes the targets fork (`--follow-children`).
    pub follow_children: bool,
}

/// The loaded and attached eBPF object. Maps are read through [`crate::collect`].
pub struct Tracer {
    pub(crate) ebpf: Ebpf,
    /// Per allocator object, `family (path) with N entry points`, for the last process whose
    /// allocators were attached: what the start line says.
    pub attached: Vec<String>,
    /// Per allocator object, `family (path) [symbols probed]` (an entry probe moved past an
    /// instruction the kernel would single-step shows as `free+9`, an alias as
    /// `alias=symbol`): for `--verbose` and the JSON report.
    pub entry_points: Vec<String>,
    /// The object's uprobe programs loaded for multi-uprobe links, when the kernel has them.
    multi: Option<multi::Programs>,
    /// The allocator probes' links, per process.
    links: HashMap<u32, Vec<Link>>,
    /// The growth probes' links, per process.
    growth_links: HashMap<u32, Vec<Link>>,
    /// The allocator objects of each process, as it sees them ([`Tracer::note_allocator_text`]).
    allocator_paths: HashMap<u32, Vec<String>>,
    page_faults: bool,
    /// Whether [`EXEC_TRACEPOINT`] is attached.
    execs: bool,
    /// The `otel_memory` sites' argument specs written so far.
    usdt_slots: usdt::Slots,
}

/// Where `task:task_newtask`'s `pid` and `clone_flags` are in its record, from the event's
/// format in tracefs.
fn newtask_fields() -> Result<(u32, u32)> {
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|d| std::fs::read_to_string(format!("{d}/events/task/task_newtask/format")).ok())
        .ok_or_else(|| {
            Error::Ebpf(
                "--follow-children needs the task:task_newtask tracepoint (tracefs at \
                 /sys/kernel/tracing)"
                    .into(),
            )
        })?;
    let offset = |field: &str| {
        format.lines().find_map(|l| {
            let (decl, rest) = l.trim().strip_prefix("field:")?.split_once(';')?;
            if decl.split_whitespace().last()? != field {
                return None;
            }
            rest.trim()
                .strip_prefix("offset:")?
                .split(';')
                .next()?
                .parse()
                .ok()
        })
    };
    match (offset("pid"), offset("clone_flags")) {
        (Some(pid), Some(flags)) => Ok((pid, flags)),
        _ => Err(Error::Ebpf(
            "task:task_newtask has no pid or clone_flags field here: --follow-children cannot \
             tell processes from threads"
                .into(),
        )),
    }
}

/// A single-stepped uprobe hit on this kind of machine, and an emulated one (µs): what the start
/// line quotes (`attach::placement` has the measurement).
const SINGLE_STEP_US: f64 = 14.0;
const EMULATED_US: f64 = 0.5;

/// Set to 1, uprobes are attached as perf-event uprobes even where the kernel has
/// multi-uprobe links (to compare the two).
pub const PERF_UPROBES_ENV: &str = "BRIDGE_TRACE_PERF_UPROBES";

/// One attachment of a program: a perf-event uprobe of aya's, or a multi-uprobe link holding
/// `places`; and what a hit of it costs beyond its program's run time ([`Hit`]).
struct Link {
    program: &'static str,
    hit: Hit,
    kind: LinkKind,
}

enum LinkKind {
    Perf(UProbeLinkId),
    Multi { fd: OwnedFd, places: usize },
}

impl Link {
    fn places(&self) -> usize {
        match self.kind {
            LinkKind::Perf(..) => 1,
            LinkKind::Multi { places, .. } => places,
        }
    }
}

/// What one run of a uprobe program costs the traced thread beyond the program itself: an
/// entry probe's trap, whose instruction the kernel either emulates or single-steps; a return
/// probe's extra trap on the way back (its entry shares the trap of the entry probe at the
/// same place); a probe on a USDT site's 5-byte nop, which the kernel turns into a call. Ordered
/// by cost: a program with places of both kinds is charged the dearer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hit {
    Nop,
    Return,
    Emulated,
    SingleStepped,
}

/// An attachment taken out of its program, to be dropped (detached) anywhere.
enum Detaching {
    // Held only to be dropped.
    #[allow(dead_code)]
    Perf(UProbeLink),
    #[allow(dead_code)]
    Multi(OwnedFd),
}

/// Whether `program` is a return probe: its section in the object says so (`uretprobe`).
fn is_return(program: &str) -> bool {
    static RETURNS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let returns = RETURNS.get_or_init(|| match aya_obj::Object::parse(EBPF_OBJECT) {
        Ok(object) => object
            .programs
            .iter()
            .filter(|(_, p)| matches!(p.section, aya_obj::ProgramSection::URetProbe { .. }))
            .map(|(name, _)| name.clone())
            .collect(),
        Err(_) => Vec::new(),
    });
    returns.iter().any(|name| name == program)
}

/// Takes `links` out of their programs, ready to be dropped.
fn detaching(ebpf: &mut Ebpf, links: Vec<Link>) -> Vec<Detaching> {
    let mut owned = Vec::with_capacity(links.len());
    for link in links {
        match link.kind {
            LinkKind::Perf(id) => {
                if let Ok(p) = loaded_uprobe(ebpf, link.program) {
                    owned.extend(p.take_link(id).ok().map(Detaching::Perf));
                }
            }
            LinkKind::Multi { fd, .. } => owned.push(Detaching::Multi(fd)),
        }
    }
    owned
}

/// Drops `items` (links) on several threads: each link's detach waits for a grace period
/// (about 0.1 s here), and multi-uprobe links closed at once share it. (Perf-event uprobes
/// gain nothing: the kernel unregisters them one at a time under one lock.)
fn drop_in_parallel<T: Send>(mut items: Vec<T>) {
    const THREADS: usize = 16;
    if items.len() < 2 {
        return;
    }
    let chunk = items.len().div_ceil(THREADS);
    std::thread::scope(|s| {
        while !items.is_empty() {
            let rest = items.split_off(items.len().saturating_sub(chunk));
            s.spawn(move || drop(rest));
        }
    });
}

impl Drop for Tracer {
    /// Detaches every probe, several at a time (the object and its maps go after).
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        let (probes, links) = (self.probe_count(), self.link_count());
        let all: Vec<_> = self
            .links
            .drain()
            .chain(self.growth_links.drain())
            .flat_map(|(_, l)| l)
            .collect();
        self.detach(all);
        tracing::info!(
            probes,
            links,
            multi = self.multi.is_some(),
            ms = started.elapsed().as_millis() as u64,
            "detached"
        );
    }
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
    /// Loads the object and attaches the probes of every allocator object ([`allocator_probes`]), for
    /// process `knobs.tgid`.
    pub fn attach(allocators: &[Allocator], knobs: Knobs) -> Result<Tracer> {
        let mut tracer = Tracer::load(knobs)?;
        tracer.trace_allocator(knobs.tgid, allocators)?;
        Ok(tracer)
    }

    /// Loads the object, nothing attached, no process traced yet.
    pub fn load(knobs: Knobs) -> Result<Tracer> {
        check_privileges()?;
        let launched = u32::from(knobs.launched);
        let unwind = knobs.unwind as u32;
        let hold = if knobs.launched { knobs.tgid } else { 0 };
        let (pid_at, flags_at) = if knobs.follow_children {
            newtask_fields()?
        } else {
            (8, 32)
        };
        let ebpf = EbpfLoader::new()
            .override_global(global::STOP_AT_EXIT, &launched, true)
            .override_global(global::STOP_AT_START, &launched, true)
            .override_global(global::HOLD_TGID, &hold, true)
            .override_global(global::NEWTASK_PID_AT, &pid_at, true)
            .override_global(global::NEWTASK_FLAGS_AT, &flags_at, true)
            .override_global(global::UNWIND_MODE, &unwind, true)
            .map_max_entries(map::ALLOCS, knobs.max_allocs)
            .load(EBPF_OBJECT)
            .map_err(|e| ebpf_err("loading the eBPF object", chain(&e)))?;
        let multi = if std::env::var_os(PERF_UPROBES_ENV).is_some_and(|v| v == "1") {
            None
        } else {
            match multi::Programs::new(&ebpf, EBPF_OBJECT, program::ALLOC_RETURN) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::info!("perf-event uprobes (no multi-uprobe links: {e})");
                    None
                }
            }
        };
        let mut tracer = Tracer {
            ebpf,
            multi,
            attached: Vec::new(),
            entry_points: Vec::new(),
            links: HashMap::new(),
            growth_links: HashMap::new(),
            allocator_paths: HashMap::new(),
            page_faults: false,
            execs: false,
            usdt_slots: usdt::Slots::default(),
        };
        tracer.fill_exp_table()?;
        Ok(tracer)
    }

    /// Starts tracing `pid`'s allocators: the process joins the targets and every entry point
    /// each allocator object defines is probed for it ([`allocator_probes`]).
    pub fn trace_allocator(&mut self, pid: u32, allocators: &[Allocator]) -> Result<()> {
        let nz = NonZeroU32::new(pid).ok_or_else(|| Error::Usage("cannot trace pid 0".into()))?;
        self.add_target(pid)?;
        self.attach_exec_tracepoint()?;
        if allocators.iter().any(|a| a.family != "glibc") {
            // Their release functions may end in one another (operator delete in free).
            let mut cfg: Array<&mut MapData, u64> = self.map_mut(map::CONFIG)?;
            cfg.set(config::NESTED_FREES, 1, 0)
                .map_err(|e| ebpf_err("configuring nested frees", chain(&e)))?;
        }
        let (mut summary, mut described) = (Vec::new(), Vec::new());
        for allocator in allocators {
            let mut attached: Vec<String> = Vec::new();
            // Entry points whose probe the kernel single-steps (no emulated place found).
            let mut stepped: Vec<String> = Vec::new();
            // Each program's places in this object, in the order of [`allocator_probes`]
            // (what releases first, each return before its entry), attached one program at
            // a time: the same order holds.
            let mut groups: Vec<(&'static str, Vec<ProbeAt>)> = Vec::new();
            let follow = self.multi.is_some();
            for p in allocator_probes(allocator) {
                let placed = locate(&allocator.host_path, &p.symbol, Some(p.reads), follow);
                let (at, offset) = match placed {
                    Ok(placed) => placed,
                    Err(e) => {
                        self.untrace_allocator(pid);
                        return Err(e);
                    }
                };
                match groups.iter_mut().find(|(program, _)| *program == p.program) {
                    Some((_, places)) if places.iter().any(|q| q.at == at.at) => {}
                    Some((_, places)) => places.push(at),
                    None => groups.push((p.program, vec![at])),
                }
                if at.stepped && !stepped.contains(&p.symbol) {
                    stepped.push(p.symbol.clone());
                }
                // Entry probes moved past an instruction the kernel would single-step:
                // `free+9`.
                let shown = if offset > 0 {
                    format!("{}+{offset}", p.symbol)
                } else {
                    p.symbol.clone()
                };
                if p.program != "alloc_return" && !attached.contains(&shown) {
                    attached.push(shown);
                }
            }
            for (program, places) in groups {
                let placed = attach_places(
                    &mut self.ebpf,
                    self.multi.as_mut(),
                    program,
                    &allocator.host_path,
                    &places,
                    nz,
                );
                match placed {
                    Ok(links) => self.links.entry(pid).or_default().extend(links),
                    Err(e) => {
                        self.untrace_allocator(pid);
                        return Err(e);
                    }
                }
            }
            for (alias, target) in &allocator.aliases {
                attached.push(format!("{alias}={target}"));
            }
            summary.push(format!(
                "{} with {} entry points{}",
                allocator.describe(),
                attached.len(),
                if stepped.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} single-stepped: ~{SINGLE_STEP_US} µs a call instead of \
                         {EMULATED_US})",
                        stepped.join(", ")
                    )
                }
            ));
            described.push(format!(
                "{} [{}]",
                allocator.describe(),
                attached.join(", ")
            ));
        }
        self.attached = summary;
        self.entry_points = described;
        self.allocator_paths
            .insert(pid, allocators.iter().map(|a| a.path.clone()).collect());
        Ok(())
    }

    /// How many uprobes are attached, all processes together.
    pub fn probe_count(&self) -> usize {
        self.all_links().map(Link::places).sum()
    }

    /// Every link, allocator and growth probes, of every process.
    fn all_links(&self) -> impl Iterator<Item = &Link> {
        self.links
            .values()
            .chain(self.growth_links.values())
            .flatten()
    }

    /// How many links hold them: each detaches in a grace period of its own (about 0.1 s).
    pub fn link_count(&self) -> usize {
        self.all_links().count()
    }

    /// What a run of each attached uprobe program costs beyond its own run time, as its
    /// places are in the targets: the dearest of its places' [`Hit`]s. Programs that are not
    /// uprobes (tracepoints) are not listed.
    pub fn hit_classes(&self) -> HashMap<&'static str, Hit> {
        let mut classes: HashMap<&'static str, Hit> = HashMap::new();
        for link in self.all_links() {
            let class = classes.entry(link.program).or_insert(link.hit);
            *class = (*class).max(link.hit);
        }
        classes
    }

    /// Whether the probes are multi-uprobe links (their detaches share grace periods).
    pub fn multi_links(&self) -> bool {
        self.multi.is_some()
    }

    /// Tells the kernel where `pid`'s allocator objects' code is mapped now (`maps`): a free
    /// from there of an address never handed out is the allocator's own (glibc's per-thread
    /// cache at thread exit), counted apart from the program's unknown frees. Called after
    /// [`Tracer::trace_allocator`] by whoever holds the maps, and whenever they are re-read (a
    /// launched program maps its libc after its probes).
    pub fn note_allocator_text(&mut self, pid: u32, maps: &[crate::model::maps::Mapping]) {
        let Some(paths) = self.allocator_paths.get(&pid) else {
            return;
        };
        let mut text = TextRanges::default();
        for (slot, m) in text.ranges.iter_mut().zip(
            maps.iter()
                .filter(|m| m.executable && paths.contains(&m.path)),
        ) {
            *slot = [m.start, m.end];
        }
        if let Ok(mut map) =
            self.map_mut::<BpfHashMap<&mut MapData, u32, TextRanges>>(map::ALLOCATOR_TEXT)
        {
            let _ = map.insert(pid, text, 0);
        }
    }

    /// Attaches the floor's programs ([`floor_probes`]) for `pid` (`bridge-trace floor`).
    pub fn attach_floor(
        &mut self,
        pid: u32,
        allocator: &Allocator,
        parts: FloorParts,
    ) -> Result<()> {
        let nz = NonZeroU32::new(pid).ok_or_else(|| Error::Usage("cannot trace pid 0".into()))?;
        for p in floor_probes(parts) {
            let reads = static_reads(p);
            let (links, _) = attach_one(
                &mut self.ebpf,
                self.multi.as_mut(),
                p.program,
                p.symbol,
                reads,
                &allocator.host_path,
                nz,
            )?;
            self.links.entry(pid).or_default().extend(links);
        }
        Ok(())
    }

    /// Detaches `pid`'s allocator probes and forgets its live allocations and per-stack totals
    /// (their frees would no longer be seen). The process stays a target (for growth).
    pub fn untrace_allocator(&mut self, pid: u32) {
        let links = self.links.remove(&pid).unwrap_or_default();
        self.detach(links);
        self.purge::<AllocKey, AllocInfo>(map::ALLOCS, |k| k.tgid == pid);
        self.purge_per_cpu::<StackKey, StackTotals>(map::STACK_TOTALS, |k| k.tgid == pid);
        self.purge::<u32, u32>(map::USDT_CAPPED, |&p| p == pid);
        // Calls that were inside the allocator when their return probe went: left behind, their
        // entries would make the thread's next calls look nested in them, and go unrecorded.
        let threads = target::threads(pid);
        self.purge::<u32, InFlight>(map::INFLIGHT, |tid| threads.contains(tid));
    }

    /// Whether `pid`'s allocator probes are attached.
    pub fn traces_allocator(&self, pid: u32) -> bool {
        self.links.contains_key(&pid)
    }

    /// Makes `pid` a target: the probes and tracepoints record its events.
    pub fn add_target(&mut self, pid: u32) -> Result<()> {
        let mut targets: BpfHashMap<&mut MapData, u32, u32> = self.map_mut(map::TARGETS)?;
        targets
            .insert(pid, 1, 0)
            .map_err(|e| ebpf_err("adding a target", chain(&e)))
    }

    /// Stops tracing `pid` (it exited): detaches its probes and purges all its entries.
    pub fn remove_target(&mut self, pid: u32) {
        self.untrace_allocator(pid);
        let links = self.growth_links.remove(&pid).unwrap_or_default();
        self.detach(links);
        if let Ok(mut targets) = self.map_mut::<BpfHashMap<&mut MapData, u32, u32>>(map::TARGETS) {
            let _ = targets.remove(&pid);
        }
        self.allocator_paths.remove(&pid);
        if let Ok(mut text) =
            self.map_mut::<BpfHashMap<&mut MapData, u32, TextRanges>>(map::ALLOCATOR_TEXT)
        {
            let _ = text.remove(&pid);
        }
        if let Ok(mut child_of) = self.map_mut::<BpfHashMap<&mut MapData, u32, u32>>(map::CHILD_OF)
        {
            let _ = child_of.remove(&pid);
        }
        for name in [map::BREAKS, map::EXECS] {
            if let Ok(mut by_pid) = self.map_mut::<BpfHashMap<&mut MapData, u32, u64>>(name) {
                let _ = by_pid.remove(&pid);
            }
        }
        self.purge::<AllocKey, MmapRegion>(map::REGIONS, |k| k.tgid == pid);
        self.purge_per_cpu::<StackKey, GrowthTotals>(map::GROWTH, |k| k.tgid == pid);
    }

    /// Starts following the children the targets fork: each is held at its first page fault
    /// until [`Tracer::held_children`] hands it to the caller, which attaches its probes and
    /// lets it go ([`Tracer::release_child`]).
    pub fn follow_children(&mut self) -> Result<()> {
        let (name, category, event) = NEWTASK_TRACEPOINT;
        let program = loaded!(self.ebpf, name, TracePoint);
        program.attach(category, event).map_err(|e| {
            ebpf_err(
                &format!("attaching {name} to {category}:{event}"),
                chain(&e),
            )
        })?;
        self.attach_raw_tracepoint(CHILD_FAULT_TRACEPOINT)
    }

    /// Children held at their first page fault: (child, parent).
    pub fn held_children(&self) -> Vec<(u32, u32)> {
        self.ebpf
            .map(map::HELD_CHILDREN)
            .and_then(|m| BpfHashMap::<&MapData, u32, u32>::try_from(m).ok())
            .map(|held| held.iter().filter_map(|r| r.ok()).collect())
            .unwrap_or_default()
    }

    /// Forgets a held child (its probes are attached, or it cannot be followed) and sends it
    /// SIGCONT.
    pub fn release_child(&mut self, pid: u32) {
        if let Ok(mut held) = self.map_mut::<BpfHashMap<&mut MapData, u32, u32>>(map::HELD_CHILDREN)
        {
            let _ = held.remove(&pid);
        }
        // SAFETY: plain syscall; resumes the child bridge-trace stopped.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    }

    /// Attaches [`EXEC_TRACEPOINT`] once: an exec releases every block of the old image.
    fn attach_exec_tracepoint(&mut self) -> Result<()> {
        if !self.execs {
            self.attach_raw_tracepoint(EXEC_TRACEPOINT)?;
            self.execs = true;
        }
        Ok(())
    }

    /// Loads and attaches a system-wide raw tracepoint program, for as long as the tracer lives.
    fn attach_raw_tracepoint(&mut self, (name, tracepoint): (&str, &str)) -> Result<()> {
        let program = loaded!(self.ebpf, name, RawTracePoint);
        program
            .attach(tracepoint)
            .map_err(|e| ebpf_err(&format!("attaching {name} to {tracepoint}"), chain(&e)))?;
        Ok(())
    }

    /// Starts following `pid`'s heap growth: its anonymous mmap, munmap and mremap calls through
    /// `object` (its libc, see [`target::growth_object`]) and, with `heap` (`watch`), its brk
    /// calls and first-touch page faults, are attributed to its stacks; the regions it maps stay
    /// in `REGIONS` until unmapped (`record` reports those the program mapped itself). The
    /// process must be a target already.
    pub fn trace_growth(&mut self, pid: u32, object: &Path, heap: bool) -> Result<()> {
        if heap && !self.page_faults {
            self.attach_raw_tracepoint(GROWTH_TRACEPOINT)?;
            self.page_faults = true;
        }
        let nz = NonZeroU32::new(pid).ok_or_else(|| Error::Usage("cannot trace pid 0".into()))?;
        for p in GROWTH_PROBES.iter().filter(|p| heap || p.symbol != "brk") {
            match attach_one(
                &mut self.ebpf,
                self.multi.as_mut(),
                p.program,
                p.symbol,
                static_reads(p),
                object,
                nz,
            ) {
                Ok((links, _)) => self.growth_links.entry(pid).or_default().extend(links),
                Err(e @ Error::ExitedBeforeAttach(_)) => return Err(e),
                // A libc without this wrapper: its growth is still seen through page faults.
                Err(e) => tracing::debug!(pid, symbol = p.symbol, "no growth probe: {e}"),
            }
        }
        Ok(())
    }

    /// Sets the sampler's mean interval in bytes (0: record every allocation).
    pub fn set_sample_interval(&mut self, bytes: u64) -> Result<()> {
        let mut cfg: Array<&mut MapData, u64> = self.map_mut(map::CONFIG)?;
        cfg.set(config::SAMPLE_INTERVAL, bytes.min(MAX_SAMPLE_INTERVAL), 0)
            .map_err(|e| ebpf_err("setting the sampling interval", chain(&e)))
    }

    /// Quantiles of the unit exponential distribution for the kernel's sampler.
    fn fill_exp_table(&mut self) -> Result<()> {
        let mut table: Array<&mut MapData, u32> = self.map_mut(map::EXP_TABLE)?;
        for i in 0..EXP_QUANTILES {
            let u = (i as f64 + 0.5) / EXP_QUANTILES as f64;
            let q = (-u.ln() * (1u64 << EXP_QUANTILE_SHIFT) as f64).round() as u32;
            table
                .set(i, q, 0)
                .map_err(|e| ebpf_err("filling the sampler's table", chain(&e)))?;
        }
        Ok(())
    }

    fn map_mut<'a, M>(&'a mut self, name: &str) -> Result<M>
    where
        M: TryFrom<&'a mut aya::maps::Map>,
        M::Error: std::fmt::Display,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| Error::Ebpf(format!("map {name} missing from the object")))?;
        M::try_from(map).map_err(|e| Error::Ebpf(format!("map {name}: {e}")))
    }

    /// Detaches uprobe links of this object's programs.
    fn detach(&mut self, links: Vec<Link>) {
        drop_in_parallel(detaching(&mut self.ebpf, links));
    }

    /// Deletes the entries of hash map `name` whose key matches.
    fn purge<K: aya::Pod, V: aya::Pod>(&mut self, name: &str, matches: impl Fn(&K) -> bool) {
        let Ok(mut map) = self.map_mut::<BpfHashMap<&mut MapData, K, V>>(name) else {
            return;
        };
        let doomed: Vec<K> = map.keys().filter_map(|k| k.ok()).filter(&matches).collect();
        for k in doomed {
            let _ = map.remove(&k);
        }
    }

    fn purge_per_cpu<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        matches: impl Fn(&K) -> bool,
    ) {
        let Ok(mut map) = self.map_mut::<PerCpuHashMap<&mut MapData, K, V>>(name) else {
            return;
        };
        let doomed: Vec<K> = map.keys().filter_map(|k| k.ok()).filter(&matches).collect();
        for k in doomed {
            let _ = map.remove(&k);
        }
    }

    /// Attaches `start_enter` wherever a launched program is to be held while unwind tables
    /// load ([`target::hold_points`]). Without any, tables load at the next look at the maps.
    pub fn attach_holds(&mut self, program: &Path, allocator: &Allocator, pid: u32) -> Result<()> {
        let pid = NonZeroU32::new(pid).ok_or_else(|| Error::Usage("cannot trace pid 0".into()))?;
        let label = program::START_ENTER;
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
        let loaded = self
            .ebpf
            .programs()
            .filter_map(|(name, p)| Some((name, p.fd().ok()?.as_fd())))
            .chain(self.multi.iter().flat_map(|m| m.loaded()));
        let mut costs: Vec<ProgramCost> = Vec::new();
        for (name, fd) in loaded {
            let Some(info) = prog_info(fd) else {
                tracing::debug!(program = name, "could not read bpf_prog_info");
                continue;
            };
            // A program loaded for both kinds of link is one program to the reader.
            match costs.iter_mut().find(|c| c.program == name) {
                Some(c) => {
                    c.runs += info.run_cnt;
                    c.run_time_ns += info.run_time_ns;
                    c.missed_runs += info.recursion_misses;
                }
                None => costs.push(ProgramCost {
                    program: name.to_string(),
                    runs: info.run_cnt,
                    run_time_ns: info.run_time_ns,
                    missed_runs: info.recursion_misses,
                }),
            }
        }
        costs
    }
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
    Ok(loaded!(ebpf, name, UProbe))
}

/// Where a probe on `symbol` of `object` goes: its offset in the file, and how far past the
/// symbol [`placement::place`] put it for an entry program that reads `reads` (the function's
/// first instruction when `None`). A return probe goes to the same place as its entry probe,
/// so that the entry program still finds the real return address at `[rsp]` (a return probe
/// replaces it with its trampoline's as soon as it fires).
///
/// With `follow` (multi-uprobe links, which carry a cookie per place) the probe may go past a
/// reuse of an argument's register once the argument was copied ([`placement::Placed`]).
/// Returns the place (file offset and cookie) and the offset past the symbol.
fn locate(
    object: &Path,
    symbol: &str,
    reads: Option<Reads>,
    follow: bool,
) -> Result<(ProbeAt, u64)> {
    let located = placement::locate_symbol(object, symbol, reads, follow)
        .ok_or_else(|| Error::Ebpf(format!("no symbol {symbol} in {}", object.display())))?;
    let (past, cookie) = located
        .placed
        .as_ref()
        .map_or((0, 0), |p| (p.offset, p.cookie()));
    Ok((
        ProbeAt {
            at: located.file_offset + past,
            cookie,
            stepped: located.stepped,
        },
        past,
    ))
}

/// A probe's place: its offset in the file, its cookie for the entry program, and whether the
/// kernel single-steps the instruction there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProbeAt {
    at: u64,
    cookie: u64,
    stepped: bool,
}

/// Attaches `program` for `pid` at `places` (offsets in the file) of `object`: one
/// multi-uprobe link when `multi` is there, one perf-event uprobe per place otherwise (all or
/// none).
fn attach_places(
    ebpf: &mut Ebpf,
    multi: Option<&mut multi::Programs>,
    program: &'static str,
    object: &Path,
    places: &[ProbeAt],
    pid: NonZeroU32,
) -> Result<Vec<Link>> {
    if places.is_empty() {
        return Ok(Vec::new());
    }
    let hit_at = |stepped: bool| match stepped {
        _ if is_return(program) => Hit::Return,
        true => Hit::SingleStepped,
        false => Hit::Emulated,
    };
    if let Some(multi) = multi {
        let offsets: Vec<u64> = places.iter().map(|p| p.at).collect();
        let cookies: Vec<u64> = places.iter().map(|p| p.cookie).collect();
        let fd = multi.attach(program, object, &offsets, &cookies, &[], pid.get())?;
        return Ok(vec![Link {
            program,
            hit: hit_at(places.iter().any(|p| p.stepped)),
            kind: LinkKind::Multi {
                fd,
                places: places.len(),
            },
        }]);
    }
    let loaded = loaded_uprobe(ebpf, program)?;
    let mut links = Vec::with_capacity(places.len());
    for &ProbeAt {
        at,
        cookie,
        stepped,
    } in places
    {
        // Perf-event uprobes carry no cookie here: placed without following copies.
        debug_assert_eq!(cookie, 0);
        let attached = loaded.attach(
            UProbeAttachLocation::AbsoluteOffset(at),
            object,
            UProbeScope::OneProcess(pid),
        );
        match attached {
            Ok(id) => links.push((id, stepped)),
            Err(e) => {
                for (id, _) in links {
                    let _ = loaded.detach(id);
                }
                let msg = chain(&e);
                return Err(
                    if msg.contains("No such process") || msg.contains("ESRCH") {
                        Error::ExitedBeforeAttach(pid.get())
                    } else {
                        ebpf_err(
                            &format!("attaching {program} to {}+{at:#x}", object.display()),
                            msg,
                        )
                    },
                );
            }
        }
    }
    Ok(links
        .into_iter()
        .map(|(id, stepped)| Link {
            program,
            hit: hit_at(stepped),
            kind: LinkKind::Perf(id),
        })
        .collect())
}

/// Attaches `program` for `pid` to `symbol` of `object` ([`locate`]). Returns the links and
/// the offset past the symbol.
fn attach_one(
    ebpf: &mut Ebpf,
    multi: Option<&mut multi::Programs>,
    program: &'static str,
    symbol: &str,
    reads: Option<Reads>,
    object: &Path,
    pid: NonZeroU32,
) -> Result<(Vec<Link>, u64)> {
    let (at, past) = locate(object, symbol, reads, multi.is_some())?;
    let links = attach_places(ebpf, multi, program, object, &[at], pid)?;
    Ok((links, past))
}

#[cfg(test)]
mod tests {
    use bridge_trace_common::names::{global, map, program};
    use object::{Object as _, ObjectSymbol as _};

    use super::*;
    use crate::target::EntryKind;

    /// The return programs are told by their section in the object.
    #[test]
    fn return_programs_are_told_by_the_object() {
        for name in [
            program::ALLOC_RETURN,
            program::GROWTH_RETURN,
            program::FLOOR_RETURN,
            program::FLOOR_RETURN_EMPTY,
        ] {
            assert!(is_return(name), "{name}");
        }
        for name in [
            program::MALLOC_ENTER,
            program::FREE_ENTER,
            program::FLOOR_ENTER,
        ] {
            assert!(!is_return(name), "{name}");
        }
    }

    /// Every map, global and program the user half asks for by name is in the object that
    /// build.rs built (read as a file: no root, nothing loaded).
    #[test]
    fn every_name_the_user_half_uses_is_in_the_object() {
        let elf = object::File::parse(EBPF_OBJECT).expect("the eBPF object parses");
        let symbols: std::collections::HashSet<&str> =
            elf.symbols().filter_map(|s| s.name().ok()).collect();
        let missing: Vec<&str> = map::ALL
            .iter()
            .chain(global::ALL)
            .chain(program::ALL)
            .copied()
            .filter(|name| !symbols.contains(name))
            .collect();
        assert!(missing.is_empty(), "not in the eBPF object: {missing:?}");
        // And the probe tables name only programs of the object.
        let tables = GROWTH_PROBES
            .iter()
            .chain(floor_probes(FloorParts::All))
            .chain(floor_probes(FloorParts::FreeEntry))
            .map(|p| p.program)
            .chain(
                target::ENTRY_POINTS
                    .iter()
                    .map(|(_, kind)| entry_program(*kind).0),
            );
        for name in tables {
            assert!(
                program::ALL.contains(&name),
                "{name} is not in names::program"
            );
        }
    }

    /// What releases memory is attached first, then each allocation function's return probe
    /// before its entry probe, and `_exit` last.
    #[test]
    fn allocator_probes_attach_in_a_safe_order() {
        let allocator = Allocator {
            entries: vec![
                ("malloc".into(), EntryKind::Malloc),
                ("free".into(), EntryKind::Free),
                ("calloc".into(), EntryKind::Calloc),
            ],
            exit: true,
            path: "/lib/libc.so.6".into(),
            host_path: "/lib/libc.so.6".into(),
            family: "glibc".into(),
            aliases: Vec::new(),
        };
        let probes = allocator_probes(&allocator);
        let order: Vec<(&str, &str)> = probes
            .iter()
            .map(|p| (p.program, p.symbol.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (program::FREE_ENTER, "free"),
                (program::ALLOC_RETURN, "malloc"),
                (program::MALLOC_ENTER, "malloc"),
                (program::ALLOC_RETURN, "calloc"),
                (program::CALLOC_ENTER, "calloc"),
                (program::EXIT_ENTER, "_exit"),
            ]
        );
    }
}
