//! Unwind tables for the kernel half's stack walker. [`compile`] turns one object's call-frame
//! information into rows; [`Tables`] owns the four unwind maps (`UNWIND_ROWS`, `UNWIND_PAGES`
//! and `UNWIND_RULES`, written through memory mappings, and `UNWIND_PROCS`), loads each object's table once (keyed by build-id, so
//! processes mapping the same file share it) and publishes every traced process's executable
//! mappings; [`Builder`] compiles tables on a thread of its own, so attaching never waits for a
//! large object.
pub mod compile;

use std::{collections::HashMap, fs::File, os::fd::AsFd as _, path::PathBuf, sync::Arc};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use bridge_trace_common::names::map;
use bridge_trace_common::{
    ProcUnwind, UnwindMapping, UnwindPage, UnwindRow, UnwindRule, MAX_UNWIND_MAPPINGS,
    MAX_UNWIND_PAGES, MAX_UNWIND_ROWS, MAX_UNWIND_RULES, NO_UNWIND_RULE,
};
use object::{Object as _, ObjectSegment as _};
use tokio::sync::mpsc;

use crate::{
    attach::Tracer,
    error::{Error, Result},
    model::{
        maps::{host_path, Mapping},
        meta::UnwindSummary,
    },
};

/// An executable file mapped by a traced process, as found in its maps.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub dev: String,
    pub inode: u64,
    /// The path as the process sees it.
    pub path: String,
    /// Where bridge-trace can open it (through /proc/PID/root).
    pub host_path: PathBuf,
}

impl ObjectRef {
    /// The object behind one of `pid`'s mappings.
    fn of(pid: u32, m: &Mapping) -> ObjectRef {
        ObjectRef {
            dev: m.dev.clone(),
            inode: m.inode,
            path: m.path.clone(),
            host_path: host_path(pid, &m.path),
        }
    }

    fn file_key(&self) -> (String, u64) {
        (self.dev.clone(), self.inode)
    }
}

/// An object's compiled table and what is needed to place it in a process.
#[derive(Debug)]
pub struct Compiled {
    pub object: ObjectRef,
    pub result: std::result::Result<CompiledObject, String>,
}

#[derive(Debug)]
pub struct CompiledObject {
    pub build_id: Option<Vec<u8>>,
    /// Executable loadable segments: (file offset, virtual address, file size).
    pub segments: Vec<(u64, u64, u64)>,
    pub table: compile::Table,
}

/// Compiles the table of one object (blocking; run it on the [`Builder`]'s thread).
pub fn compile_object(object: &ObjectRef) -> Compiled {
    let result = (|| {
        let file = File::open(&object.host_path).map_err(|e| e.to_string())?;
        // SAFETY: a read-only private mapping of a file; a concurrent truncation could fault,
        // as for any tool reading binaries in place (perf, gdb), but shared libraries and
        // executables in use are not truncated (ETXTBSY).
        let data = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
        let elf = object::File::parse(&*data).map_err(|e| e.to_string())?;
        let build_id = elf.build_id().ok().flatten().map(|b| b.to_vec());
        let segments = elf
            .segments()
            .filter(|s| match s.flags() {
                object::SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                _ => true,
            })
            .map(|s| {
                let (off, size) = s.file_range();
                (off, s.address(), size)
            })
            .collect();
        let table = compile::compile(&data).map_err(|e| e.to_string())?;
        Ok(CompiledObject {
            build_id,
            segments,
            table,
        })
    })();
    Compiled {
        object: object.clone(),
        result,
    }
}

/// Compiles the tables of `objects` on every core, blocking until all are done.
pub fn compile_all(objects: &[ObjectRef]) -> Vec<Compiled> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::with_capacity(objects.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads.min(objects.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(object) = objects.get(i) else { return };
                let compiled = compile_object(object);
                done.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(compiled);
            });
        }
    });
    done.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Compiles tables on one background thread, in request order.
pub struct Builder {
    tx: std::sync::mpsc::Sender<ObjectRef>,
}

impl Builder {
    /// Starts the thread; compiled tables arrive on the returned receiver.
    pub fn start() -> (Builder, mpsc::UnboundedReceiver<Compiled>) {
        let (tx, rx) = std::sync::mpsc::channel::<ObjectRef>();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("unwind-tables".into())
            .spawn(move || {
                while let Ok(object) = rx.recv() {
                    if done_tx.send(compile_object(&object)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the unwind-table thread");
        (Builder { tx }, done_rx)
    }

    pub fn request(&self, object: ObjectRef) {
        let _ = self.tx.send(object);
    }
}

/// Where an object's table is: its page index in the page array (whose entries are row
/// numbers in the row array).
#[derive(Clone, Copy, Debug)]
struct Placed {
    rows: u32,
    page_start: u32,
    first_page: u32,
    page_count: u32,
}

#[derive(Clone, Debug)]
enum State {
    /// Requested from the builder, not back yet.
    Pending,
    Loaded(Arc<LoadedObject>),
    Failed,
}

#[derive(Debug)]
struct LoadedObject {
    placed: Placed,
    segments: Vec<(u64, u64, u64)>,
}

/// A BPF_F_MMAPABLE array map, memory-mapped: filled front to back, never rewritten.
struct Mapped<T: Copy> {
    ptr: *mut T,
    capacity: u32,
    next: u32,
    _map: MapData,
}

impl<T: Copy> Mapped<T> {
    fn map(map: MapData, capacity: u32, what: &str) -> Result<Mapped<T>> {
        use std::os::fd::AsRawFd as _;
        let len = capacity as usize * std::mem::size_of::<T>();
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: maps the array's value area, exactly its size; the mapping is released in
        // Drop and outlives every write through `ptr`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(
                format!("mapping the unwind {what}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Mapped {
            ptr: ptr.cast(),
            capacity,
            next: 0,
            _map: map,
        })
    }

    /// Appends `items` and returns where they start, or None when the array is full.
    fn push(&mut self, items: &[T]) -> Option<u32> {
        let count = u32::try_from(items.len()).ok()?;
        if count > self.capacity - self.next {
            return None;
        }
        // SAFETY: [next, next + count) is inside the mapping (checked above) and written by no
        // one else: the kernel half only reads it, and only entries already published.
        unsafe {
            std::ptr::copy_nonoverlapping(
                items.as_ptr(),
                self.ptr.add(self.next as usize),
                items.len(),
            )
        };
        let start = self.next;
        self.next += count;
        Some(start)
    }
}

impl<T: Copy> Drop for Mapped<T> {
    fn drop(&mut self) {
        let len = self.capacity as usize * std::mem::size_of::<T>();
        // SAFETY: the mapping made in `Mapped::map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), len) };
    }
}

/// The owner of the unwind maps.
pub struct Tables {
    rows: Mapped<UnwindRow>,
    rules: Mapped<UnwindRule>,
    /// Index of every rule in `rules`.
    rule_ids: HashMap<UnwindRule, u32>,
    pages: Mapped<UnwindPage>,
    procs: BpfHashMap<MapData, u32, ProcUnwind>,
    by_file: HashMap<(String, u64), State>,
    by_build_id: HashMap<Vec<u8>, Arc<LoadedObject>>,
    /// What each process was last published with, to skip identical updates.
    published: HashMap<u32, Vec<UnwindMapping>>,
    /// Bumped at every publication (see `ProcUnwind::generation`).
    generation: u32,
    summary: UnwindSummary,
}

fn take(tracer: &mut Tracer, name: &str) -> Result<Map> {
    tracer
        .ebpf
        .take_map(name)
        .ok_or_else(|| Error::Ebpf(format!("map {name} missing from the object")))
}

impl Tables {
    pub fn new(tracer: &mut Tracer, mode: &str) -> Result<Tables> {
        let Map::Array(rows) = take(tracer, map::UNWIND_ROWS)? else {
            return Err(Error::Ebpf("UNWIND_ROWS is not an array".into()));
        };
        let rows = Mapped::map(rows, MAX_UNWIND_ROWS, "rows")?;
        let Map::Array(pages) = take(tracer, map::UNWIND_PAGES)? else {
            return Err(Error::Ebpf("UNWIND_PAGES is not an array".into()));
        };
        let pages = Mapped::map(pages, MAX_UNWIND_PAGES, "page index")?;
        let Map::Array(rules) = take(tracer, map::UNWIND_RULES)? else {
            return Err(Error::Ebpf("UNWIND_RULES is not an array".into()));
        };
        let mut rules = Mapped::map(rules, MAX_UNWIND_RULES, "rules")?;
        // Rule 0: no unwind information.
        let none = UnwindRule::default();
        debug_assert_eq!(none.cfa_rule, bridge_trace_common::cfa_rule::NONE);
        rules.push(&[none]);
        let rule_ids = HashMap::from([(none, NO_UNWIND_RULE)]);
        let procs = BpfHashMap::try_from(take(tracer, map::UNWIND_PROCS)?)
            .map_err(|e| Error::Ebpf(format!("UNWIND_PROCS: {e}")))?;
        Ok(Tables {
            rows,
            rules,
            rule_ids,
            pages,
            procs,
            by_file: HashMap::new(),
            by_build_id: HashMap::new(),
            published: HashMap::new(),
            generation: 0,
            summary: UnwindSummary {
                mode: mode.to_string(),
                ..UnwindSummary::default()
            },
        })
    }

    /// Executable objects of `maps` whose tables were never requested; marks them pending.
    pub fn wanted(&mut self, pid: u32, maps: &[Mapping]) -> Vec<ObjectRef> {
        let mut out = Vec::new();
        for m in maps.iter().filter(|m| m.executable) {
            let object = ObjectRef::of(pid, m);
            let key = object.file_key();
            if self.by_file.contains_key(&key) {
                continue;
            }
            self.by_file.insert(key, State::Pending);
            out.push(object);
        }
        out
    }

    /// Loads a compiled table into the row array (once per file, and once per build-id).
    pub fn insert(&mut self, compiled: Compiled) {
        let key = compiled.object.file_key();
        if matches!(self.by_file.get(&key), Some(State::Loaded(_))) {
            return;
        }
        let name = compiled.object.path.clone();
        let c = match compiled.result {
            Ok(c) => c,
            Err(reason) => {
                tracing::debug!(object = %name, %reason, "no unwind table");
                self.summary.missing.push((name, reason));
                self.by_file.insert(key, State::Failed);
                return;
            }
        };
        let ms = c.table.stats.build_time.as_secs_f64() * 1e3;
        self.summary.build_ms += ms;
        if self.summary.slowest.as_ref().is_none_or(|(_, t)| ms > *t) {
            self.summary.slowest = Some((name.clone(), ms));
        }
        if let Some(loaded) = c.build_id.as_ref().and_then(|b| self.by_build_id.get(b)) {
            self.by_file.insert(key, State::Loaded(loaded.clone()));
            return;
        }
        if c.table.rows.is_empty() {
            self.summary
                .missing
                .push((name, "no call-frame information".into()));
            self.by_file.insert(key, State::Failed);
            return;
        }
        let (first_page, mut index) = c.table.page_index();
        let rows = self.row_ids(&c.table.rows);
        let placed = match rows.and_then(|rows| self.rows.push(&rows)) {
            Some(row_start) => {
                for page in index.iter_mut() {
                    page.first += row_start;
                    page.last += row_start;
                }
                self.pages.push(&index).map(|page_start| Placed {
                    rows: c.table.rows.len() as u32,
                    page_start,
                    first_page,
                    page_count: index.len() as u32,
                })
            }
            None => None,
        };
        let Some(placed) = placed else {
            // Rows pushed before a full page index stay unused: capacity, not correctness.
            self.summary
                .missing
                .push((name, "the unwind tables are full".into()));
            self.by_file.insert(key, State::Failed);
            return;
        };
        tracing::debug!(object = %name, rows = placed.rows, ms, "unwind table loaded");
        self.summary.objects += 1;
        self.summary.rows += u64::from(placed.rows);
        let loaded = Arc::new(LoadedObject {
            placed,
            segments: c.segments,
        });
        if let Some(b) = c.build_id {
            self.by_build_id.insert(b, loaded.clone());
        }
        self.by_file.insert(key, State::Loaded(loaded));
    }

    /// A table's rows as loaded: each rule replaced by its index in the rule array (new rules
    /// are added). None when the rule array is full.
    fn row_ids(&mut self, rows: &[compile::CompiledRow]) -> Option<Vec<UnwindRow>> {
        rows.iter()
            .map(|r| {
                let rule = match self.rule_ids.get(&r.rule) {
                    Some(&id) => id,
                    None => {
                        let id = self.rules.push(&[r.rule])?;
                        self.rule_ids.insert(r.rule, id);
                        id
                    }
                };
                Some(UnwindRow { pc: r.pc, rule })
            })
            .collect()
    }

    /// Tells the kernel half which of `pid`'s mappings have tables, and where.
    pub fn publish(&mut self, pid: u32, maps: &[Mapping]) -> Result<()> {
        let mut entries: Vec<UnwindMapping> = Vec::new();
        for m in maps.iter().filter(|m| m.executable) {
            let Some(State::Loaded(obj)) = self.by_file.get(&(m.dev.clone(), m.inode)) else {
                continue;
            };
            let Some(bias) = bias(m, &obj.segments) else {
                continue;
            };
            entries.push(UnwindMapping {
                start: m.start,
                end: m.end,
                bias,
                page_start: obj.placed.page_start,
                first_page: obj.placed.first_page,
                page_count: obj.placed.page_count,
                _pad: 0,
            });
        }
        entries.sort_by_key(|e| e.start);
        if entries.len() > MAX_UNWIND_MAPPINGS {
            tracing::warn!(
                pid,
                mappings = entries.len(),
                "more executable mappings than the unwinder holds; the rest use frame pointers"
            );
            entries.truncate(MAX_UNWIND_MAPPINGS);
        }
        if self.published.get(&pid) == Some(&entries) {
            return Ok(());
        }
        self.generation = self.generation.wrapping_add(1);
        let mut value = ProcUnwind {
            count: entries.len() as u32,
            generation: self.generation,
            mappings: [UnwindMapping::default(); MAX_UNWIND_MAPPINGS],
        };
        value.mappings[..entries.len()].copy_from_slice(&entries);
        self.procs
            .insert(pid, value, 0)
            .map_err(|e| Error::Ebpf(format!("publishing unwind mappings of {pid}: {e}")))?;
        self.published.insert(pid, entries);
        Ok(())
    }

    /// Removes `pid`'s mappings from the kernel's map.
    pub fn forget(&mut self, pid: u32) {
        let _ = self.procs.remove(&pid);
        self.published.remove(&pid);
    }

    /// Objects of `maps` requested from the builder and not back yet.
    fn pending(&self, pid: u32, maps: &[Mapping]) -> Vec<ObjectRef> {
        maps.iter()
            .filter(|m| m.executable)
            .map(|m| ObjectRef::of(pid, m))
            .filter(|o| matches!(self.by_file.get(&o.file_key()), Some(State::Pending)))
            .collect()
    }

    pub fn summary(&self) -> UnwindSummary {
        self.summary.clone()
    }
}

/// Runtime address minus object address for one executable mapping: found through the
/// executable segment whose pages the mapping starts in (a segment's file offset and address
/// need not be page-aligned; its mapping is).
fn bias(m: &Mapping, segments: &[(u64, u64, u64)]) -> Option<u64> {
    const PAGE: u64 = 4096;
    let (off, vaddr) = segments.iter().find_map(|&(off, vaddr, size)| {
        let (page_off, page_vaddr) = (off & !(PAGE - 1), vaddr & !(PAGE - 1));
        (m.offset >= page_off && m.offset < off + size).then_some((page_off, page_vaddr))
    })?;
    let object_addr = vaddr + (m.offset - off);
    m.start.checked_sub(object_addr)
}

/// Unwind tables kept current for traced processes: [`Tables`] fed by a [`Builder`].
pub struct Unwinder {
    tables: Tables,
    builder: Builder,
    compiled: mpsc::UnboundedReceiver<Compiled>,
}

impl Unwinder {
    /// None in frame-pointer mode (`--unwind fp`): nothing to load.
    pub fn new(tracer: &mut Tracer, unwind: Unwind) -> Result<Option<Unwinder>> {
        if unwind == Unwind::Fp {
            return Ok(None);
        }
        let tables = Tables::new(tracer, unwind.name())?;
        let (builder, compiled) = Builder::start();
        Ok(Some(Unwinder {
            tables,
            builder,
            compiled,
        }))
    }

    /// Requests the tables of objects `pid` maps that have none yet, and publishes the
    /// process's mappings with what is loaded.
    pub fn track(&mut self, pid: u32, maps: &[Mapping]) -> Result<()> {
        for object in self.tables.wanted(pid, maps) {
            self.builder.request(object);
        }
        self.tables.publish(pid, maps)
    }

    /// The next table the builder finished.
    pub async fn next_compiled(&mut self) -> Option<Compiled> {
        self.compiled.recv().await
    }

    /// Loads a finished table (publish it with [`Unwinder::track`]).
    pub fn insert(&mut self, compiled: Compiled) {
        self.tables.insert(compiled);
    }

    /// Forgets a process that exited: its mappings leave the kernel's map.
    pub fn forget(&mut self, pid: u32) {
        self.tables.forget(pid);
    }

    /// Loads a finished table and republishes `pid`'s mappings.
    pub fn loaded(&mut self, compiled: Compiled, pid: u32, maps: &[Mapping]) -> Result<()> {
        self.tables.insert(compiled);
        self.tables.publish(pid, maps)
    }

    /// Loads the tables of every object `pid` maps, on every core, before returning: for a
    /// running process, before any probe fires, so that no stack is walked without them.
    pub fn load_all(&mut self, pid: u32, maps: &[Mapping]) -> Result<()> {
        let wanted = self.tables.wanted(pid, maps);
        for compiled in compile_all(&wanted) {
            self.tables.insert(compiled);
        }
        self.tables.publish(pid, maps)
    }

    /// Loads every missing table of `pid` before returning (the target is held meanwhile):
    /// compiles those never requested here, while the builder finishes those it has.
    pub async fn load_now(&mut self, pid: u32, maps: &[Mapping]) -> Result<()> {
        let wanted = self.tables.wanted(pid, maps);
        for compiled in compile_all(&wanted) {
            self.tables.insert(compiled);
        }
        while !self.tables.pending(pid, maps).is_empty() {
            match self.compiled.recv().await {
                Some(c) => self.tables.insert(c),
                None => break,
            }
        }
        self.tables.publish(pid, maps)
    }

    pub fn summary(&self) -> UnwindSummary {
        self.tables.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_of_a_pie_text_mapping() {
        let m = Mapping {
            start: 0x5555_5555_6000,
            end: 0x5555_5555_8000,
            offset: 0x1000,
            executable: true,
            dev: "fd:01".into(),
            inode: 1,
            path: "/bin/x".into(),
        };
        let segments = [(0, 0, 0x800), (0x1000, 0x1000, 0x2000)];
        assert_eq!(bias(&m, &segments), Some(0x5555_5555_5000));
        // A non-PIE executable: text at 0x401000, mapped there.
        let m = Mapping {
            start: 0x401000,
            end: 0x402000,
            ..m
        };
        assert_eq!(bias(&m, &[(0x1000, 0x401000, 0x1000)]), Some(0));
        // lld and rustc's layout: text at file offset 0x13b50, address 0x14b50, mapped from
        // the page at offset 0x13000.
        let m = Mapping {
            start: 0x5555_5556_8000,
            end: 0x5555_5559_2000,
            offset: 0x13000,
            ..m
        };
        let segments = [(0x13b50, 0x14b50, 0x3e720)];
        assert_eq!(bias(&m, &segments), Some(0x5555_5556_8000 - 0x14000));
    }
}

/// Stack walking (`--unwind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Unwind {
    Auto,
    Dwarf,
    Fp,
}

impl Unwind {
    pub fn mode(self) -> bridge_trace_common::UnwindMode {
        use bridge_trace_common::UnwindMode;
        match self {
            Unwind::Auto => UnwindMode::Auto,
            Unwind::Dwarf => UnwindMode::Dwarf,
            Unwind::Fp => UnwindMode::Fp,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unwind::Auto => "auto",
            Unwind::Dwarf => "dwarf",
            Unwind::Fp => "fp",
        }
    }
}
