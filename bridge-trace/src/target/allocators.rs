//! The allocators a process maps: every object that may hold one (libc, anything named like
//! `*malloc*`, the executable), matched against one table of entry points, [`ENTRY_POINTS`],
//! each with the argument layout its kernel program reads ([`EntryKind`]).
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSymbol as _};

use super::{exe, map_file, refuse_go};
use crate::{
    error::{Error, Result},
    model::maps::{host_path, read_maps, Mapping},
};

/// What an allocator entry point does with its arguments: which kernel program reads them
/// ([`crate::attach`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Releases its first argument (`free`, `sdallocx`, `mi_free`, C++ `operator delete`, ...).
    Free,
    /// Allocates its first argument's bytes (`malloc`, `mallocx`, `mi_malloc_aligned`,
    /// `operator new`, ...).
    Malloc,
    /// `calloc(n, size)` and alike.
    Calloc,
    /// `realloc(ptr, size)` and alike.
    Realloc,
    /// `reallocarray(ptr, n, size)` and alike.
    Reallocarray,
    /// `posix_memalign(&ptr, align, size)`.
    PosixMemalign,
    /// `aligned_alloc(align, size)`.
    AlignedAlloc,
    /// `memalign(align, size)`.
    Memalign,
    /// `valloc(size)`.
    Valloc,
    /// `pvalloc(size)` (rounded up to pages).
    Pvalloc,
    /// jemalloc's `xallocx(ptr, size, extra, flags)`: resizes a block in place.
    Xallocx,
}

impl EntryKind {
    /// Whether it releases memory (else it allocates).
    pub fn releases(self) -> bool {
        self == EntryKind::Free
    }

    /// `--alloc-fn NAME:KIND`'s kinds.
    pub fn parse(kind: &str) -> Option<EntryKind> {
        Some(match kind {
            "alloc" | "malloc" => EntryKind::Malloc,
            "free" => EntryKind::Free,
            "calloc" => EntryKind::Calloc,
            "realloc" => EntryKind::Realloc,
            "memalign" => EntryKind::Memalign,
            _ => return None,
        })
    }
}

/// Every allocator entry point bridge-trace knows, by name: the C functions glibc and every
/// malloc replacement export, jemalloc's, mimalloc's and tcmalloc's own, and C++'s operator
/// new and delete where an allocator implements them (libstdc++'s end in malloc and free, and
/// are not probed: their frames are left out of the stacks instead, [`crate::aggregate`]).
/// A statically linked jemalloc may carry a prefix ([`PREFIXES`]).
pub const ENTRY_POINTS: &[(&str, EntryKind)] = {
    use EntryKind::*;
    &[
        ("free", Free),
        ("cfree", Free),
        ("free_sized", Free),
        ("free_aligned_sized", Free),
        ("malloc", Malloc),
        ("calloc", Calloc),
        ("realloc", Realloc),
        ("reallocarray", Reallocarray),
        ("posix_memalign", PosixMemalign),
        ("aligned_alloc", AlignedAlloc),
        ("memalign", Memalign),
        ("valloc", Valloc),
        ("pvalloc", Pvalloc),
        // jemalloc
        ("mallocx", Malloc),
        ("rallocx", Realloc),
        ("xallocx", Xallocx),
        ("dallocx", Free),
        ("sdallocx", Free),
        // mimalloc
        ("mi_free", Free),
        ("mi_cfree", Free),
        ("mi_free_size", Free),
        ("mi_free_aligned", Free),
        ("mi_free_size_aligned", Free),
        ("mi_malloc", Malloc),
        ("mi_zalloc", Malloc),
        ("mi_malloc_small", Malloc),
        ("mi_zalloc_small", Malloc),
        ("mi_malloc_aligned", Malloc),
        ("mi_zalloc_aligned", Malloc),
        ("mi_malloc_aligned_at", Malloc),
        ("mi_zalloc_aligned_at", Malloc),
        ("mi_new", Malloc),
        ("mi_new_nothrow", Malloc),
        ("mi_new_aligned", Malloc),
        ("mi_new_aligned_nothrow", Malloc),
        ("mi_calloc", Calloc),
        ("mi_mallocn", Calloc),
        ("mi_new_n", Calloc),
        ("mi_calloc_aligned", Calloc),
        ("mi_calloc_aligned_at", Calloc),
        ("mi_realloc", Realloc),
        ("mi_reallocf", Realloc),
        ("mi_rezalloc", Realloc),
        ("mi_realloc_aligned", Realloc),
        ("mi_realloc_aligned_at", Realloc),
        ("mi_rezalloc_aligned", Realloc),
        ("mi_rezalloc_aligned_at", Realloc),
        ("mi_new_realloc", Realloc),
        ("mi_reallocn", Reallocarray),
        ("mi_reallocarray", Reallocarray),
        ("mi_recalloc", Reallocarray),
        ("mi_recalloc_aligned", Reallocarray),
        ("mi_recalloc_aligned_at", Reallocarray),
        ("mi_new_reallocn", Reallocarray),
        ("mi_posix_memalign", PosixMemalign),
        ("mi_aligned_alloc", AlignedAlloc),
        ("mi_memalign", Memalign),
        ("mi_valloc", Valloc),
        ("mi_pvalloc", Pvalloc),
        // tcmalloc
        ("tc_free", Free),
        ("tc_cfree", Free),
        ("tc_free_sized", Free),
        ("tc_delete", Free),
        ("tc_deletearray", Free),
        ("tc_delete_nothrow", Free),
        ("tc_deletearray_nothrow", Free),
        ("tc_delete_sized", Free),
        ("tc_deletearray_sized", Free),
        ("tc_delete_aligned", Free),
        ("tc_deletearray_aligned", Free),
        ("tc_delete_aligned_nothrow", Free),
        ("tc_deletearray_aligned_nothrow", Free),
        ("tc_delete_sized_aligned", Free),
        ("tc_deletearray_sized_aligned", Free),
        ("tc_malloc", Malloc),
        ("tc_malloc_skip_new_handler", Malloc),
        ("tc_new", Malloc),
        ("tc_newarray", Malloc),
        ("tc_new_nothrow", Malloc),
        ("tc_newarray_nothrow", Malloc),
        ("tc_new_aligned", Malloc),
        ("tc_newarray_aligned", Malloc),
        ("tc_new_aligned_nothrow", Malloc),
        ("tc_newarray_aligned_nothrow", Malloc),
        ("tc_calloc", Calloc),
        ("tc_realloc", Realloc),
        ("tc_memalign", Memalign),
        ("tc_posix_memalign", PosixMemalign),
        ("tc_valloc", Valloc),
        ("tc_pvalloc", Pvalloc),
        // C++: operator delete (plain, sized, aligned, nothrow; single and array), then new.
        ("_ZdlPv", Free),
        ("_ZdaPv", Free),
        ("_ZdlPvm", Free),
        ("_ZdaPvm", Free),
        ("_ZdlPvRKSt9nothrow_t", Free),
        ("_ZdaPvRKSt9nothrow_t", Free),
        ("_ZdlPvSt11align_val_t", Free),
        ("_ZdaPvSt11align_val_t", Free),
        ("_ZdlPvmSt11align_val_t", Free),
        ("_ZdaPvmSt11align_val_t", Free),
        ("_ZdlPvSt11align_val_tRKSt9nothrow_t", Free),
        ("_ZdaPvSt11align_val_tRKSt9nothrow_t", Free),
        ("_Znwm", Malloc),
        ("_Znam", Malloc),
        ("_ZnwmRKSt9nothrow_t", Malloc),
        ("_ZnamRKSt9nothrow_t", Malloc),
        ("_ZnwmSt11align_val_t", Malloc),
        ("_ZnamSt11align_val_t", Malloc),
        ("_ZnwmSt11align_val_tRKSt9nothrow_t", Malloc),
        ("_ZnamSt11align_val_tRKSt9nothrow_t", Malloc),
    ]
};

/// Prefixes a statically linked allocator gives its entry points: tikv-jemallocator's
/// `_rjem_`, jemalloc's own `je_`.
pub const PREFIXES: [&str; 2] = ["_rjem_", "je_"];

/// The C++ runtime's operator new and delete, which end in malloc and free.
fn is_cxx_runtime(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("libstdc++") || base.starts_with("libc++")
}

/// An object file that implements an allocator: libc, a malloc replacement (jemalloc,
/// mimalloc, tcmalloc) linked or preloaded, or the executable itself when it links one
/// statically.
#[derive(Clone, Debug)]
pub struct Allocator {
    /// The path as seen by the process.
    pub path: String,
    /// The same file, reachable from here (through /proc/PID/root when the process is known).
    pub host_path: PathBuf,
    /// Which allocator: `glibc`, `jemalloc`, `mimalloc`, `tcmalloc`, or what the executable
    /// links (`jemalloc (static, _rjem_)`, `static`).
    pub family: String,
    /// Entry points this object defines, by symbol, aliases left out.
    pub entries: Vec<(String, EntryKind)>,
    /// (alias, the entry point it is): traced through the latter's probes.
    pub aliases: Vec<(String, String)>,
    /// `_exit`, where a launched target is held (libc only).
    pub exit: bool,
}

impl Allocator {
    /// The allocator in the object at `path` (as the process sees it), read through
    /// `host_path`: `None` unless it defines something that allocates and something that
    /// frees.
    fn from_object(path: String, host_path: PathBuf, exe: bool) -> Option<Allocator> {
        let found = allocator_symbols(&host_path);
        let allocates = found.entries.iter().any(|(_, k)| !k.releases());
        let frees = found.entries.iter().any(|(_, k)| k.releases());
        if !(allocates && frees) {
            return None;
        }
        let base = path.rsplit('/').next().unwrap_or(&path);
        let has = |name: &str| found.entries.iter().any(|(s, _)| s.ends_with(name));
        let family = if is_libc_name(&path) {
            "glibc".to_string()
        } else if let Some(known) = ["jemalloc", "mimalloc", "tcmalloc"]
            .into_iter()
            .find(|f| !exe && base.contains(f))
        {
            known.to_string()
        } else {
            let kind = if has("mallocx") {
                "jemalloc"
            } else if has("mi_malloc") {
                "mimalloc"
            } else if has("tc_malloc") {
                "tcmalloc"
            } else {
                "allocator"
            };
            match (&found.prefix, exe) {
                (Some(p), _) => format!("{kind} (static, {p})"),
                (None, true) => format!("{kind} (static)"),
                (None, false) => kind.to_string(),
            }
        };
        Some(Allocator {
            exit: found.exit,
            family,
            path,
            host_path,
            entries: found.entries,
            aliases: found.aliases,
        })
    }

    /// `family (path)`, as `record` prints it.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.family, self.path)
    }
}

/// What [`allocator_symbols`] finds in an object.
#[derive(Debug, Default)]
pub struct FoundSymbols {
    /// In [`ENTRY_POINTS`] order, by the object's own (possibly prefixed) names.
    pub entries: Vec<(String, EntryKind)>,
    pub aliases: Vec<(String, String)>,
    /// The prefix its entry points carry, when it is a prefixed static build.
    pub prefix: Option<String>,
    pub exit: bool,
}

/// The [`ENTRY_POINTS`] that `file` defines (dynamic or static symbol table), in table order,
/// without aliases; and the aliases as (alias, symbol it aliases): glibc's `aligned_alloc` is
/// `memalign`, mimalloc's `free` is `mi_free`, and probing both would run two programs on
/// every call. Unprefixed names win; else the first of [`PREFIXES`] that gives something that
/// allocates and something that frees.
pub fn allocator_symbols(file: &Path) -> FoundSymbols {
    let Some(defined) = defined_symbols(file) else {
        return FoundSymbols::default();
    };
    let prefix = if defined.contains_key("malloc") && defined.contains_key("free") {
        None
    } else {
        // The linker keeps only what the program calls: Rust's tikv-jemallocator frees with
        // sdallocx, and its `_rjem_free` may be gone.
        let any = |p: &str, names: &[&str]| {
            names
                .iter()
                .any(|n| defined.contains_key(&format!("{p}{n}")))
        };
        PREFIXES
            .iter()
            .find(|p| any(p, &["malloc", "mallocx"]) && any(p, &["free", "sdallocx", "dallocx"]))
            .map(|p| p.to_string())
    };
    let p = prefix.clone().unwrap_or_default();
    let mut found = FoundSymbols {
        prefix,
        exit: defined.contains_key("_exit"),
        ..FoundSymbols::default()
    };
    let mut seen: Vec<(u64, String)> = Vec::new();
    for (name, kind) in ENTRY_POINTS {
        // C++'s names are never prefixed.
        let symbol = if name.starts_with("_Z") {
            name.to_string()
        } else {
            format!("{p}{name}")
        };
        let Some(&addr) = defined.get(&symbol) else {
            continue;
        };
        match seen.iter().find(|(a, _)| *a == addr) {
            Some((_, first)) => found.aliases.push((symbol, first.clone())),
            None => {
                seen.push((addr, symbol.clone()));
                found.entries.push((symbol, *kind));
            }
        }
    }
    found
}

/// The functions and objects `file` defines (dynamic and static symbol tables), by name without
/// version, with their addresses.
fn defined_symbols(file: &Path) -> Option<HashMap<String, u64>> {
    let data = map_file(file)?;
    let obj = object::File::parse(&*data).ok()?;
    Some(
        obj.dynamic_symbols()
            .chain(obj.symbols())
            .filter(|s| s.is_definition() && s.address() != 0)
            .filter_map(|s| {
                let n = s.name().ok()?;
                // Versioned dynamic names look like "malloc@@GLIBC_2.2.5".
                Some((n.split('@').next().unwrap_or(n).to_string(), s.address()))
            })
            .collect(),
    )
}

/// The `--alloc-fn NAME:KIND` functions as allocators of their own (`custom`), each in the
/// first of `objects` that defines it: (path as the process sees it, path from here), the
/// program first.
pub fn custom_allocators(
    functions: &[(String, EntryKind)],
    objects: &[(String, PathBuf)],
) -> Result<Vec<Allocator>> {
    let mut tables: Vec<Option<HashMap<String, u64>>> = vec![None; objects.len()];
    let mut out: Vec<Allocator> = Vec::new();
    for (name, kind) in functions {
        let mut found = None;
        for (i, (path, host)) in objects.iter().enumerate() {
            let table = tables[i].get_or_insert_with(|| defined_symbols(host).unwrap_or_default());
            if table.contains_key(name) {
                found = Some((path, host));
                break;
            }
        }
        let Some((path, host)) = found else {
            return Err(Error::Usage(format!(
                "--alloc-fn {name}: no function {name} in {}",
                objects
                    .first()
                    .map(|(p, _)| format!("{p} or the libraries it maps"))
                    .unwrap_or_else(|| "the program".into())
            )));
        };
        match out.iter_mut().find(|a| &a.path == path) {
            Some(a) => a.entries.push((name.clone(), *kind)),
            None => out.push(Allocator {
                path: path.clone(),
                host_path: host.clone(),
                family: "custom (--alloc-fn)".into(),
                entries: vec![(name.clone(), *kind)],
                aliases: Vec::new(),
                exit: false,
            }),
        }
    }
    Ok(out)
}

/// Every allocator of running process `pid`: those it maps ([`find_allocators`]) and the
/// `--alloc-fn` functions among its objects ([`custom_allocators`]).
pub fn allocators_of(
    pid: u32,
    maps: &[Mapping],
    functions: &[(String, EntryKind)],
) -> Result<Vec<Allocator>> {
    let mut allocators = find_allocators(pid, maps)?;
    allocators.extend(custom_allocators(functions, &mapped_objects(pid, maps))?);
    Ok(allocators)
}

/// The objects a process maps, as [`custom_allocators`] searches them: its executable first.
fn mapped_objects(pid: u32, maps: &[Mapping]) -> Vec<(String, PathBuf)> {
    let exe = exe(pid);
    let mut paths: Vec<&str> = Vec::new();
    if let Some(exe) = exe.as_deref() {
        if maps.iter().any(|m| m.path == exe) {
            paths.push(exe);
        }
    }
    for m in maps {
        if m.executable && !m.path.starts_with('[') && !paths.contains(&m.path.as_str()) {
            paths.push(&m.path);
        }
    }
    paths
        .into_iter()
        .map(|p| (p.to_string(), host_path(pid, p)))
        .collect()
}

/// The objects a program about to be launched will map, as far as they can be told: itself
/// and the libraries it needs directly.
pub fn program_objects(program: &Path) -> Vec<(String, PathBuf)> {
    let mut out = vec![(program.display().to_string(), program.to_path_buf())];
    if let Ok(data) = fs::read(program) {
        for lib in needed_libraries(program, &data, |_| true) {
            out.push((lib.display().to_string(), lib));
        }
    }
    out
}

pub(super) fn is_libc_name(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base == "libc.so.6" || base == "libc.so" || (base.starts_with("libc-") && base.ends_with(".so"))
}

/// Objects that may hold an allocator: libc, anything named like a malloc replacement, and
/// the executable; never the C++ runtime.
fn may_allocate(path: &str, exe: Option<&str>) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    !is_cxx_runtime(path) && (is_libc_name(path) || base.contains("malloc") || Some(path) == exe)
}

/// Finds every allocator a process maps: the malloc replacements (jemalloc, mimalloc, tcmalloc,
/// one linked statically into the executable) first, then libc. All are traced: a call goes to
/// one of them, so nothing is counted twice, and a program with a replacement still has libc's
/// allocations made through direct calls seen.
pub fn find_allocators(pid: u32, maps: &[Mapping]) -> Result<Vec<Allocator>> {
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    if let Some(exe) = &exe {
        refuse_go(Path::new(&host_path(pid, exe)))?;
    }
    let mut candidates: Vec<&str> = Vec::new();
    for m in maps {
        if may_allocate(&m.path, exe.as_deref()) && !candidates.contains(&m.path.as_str()) {
            candidates.push(&m.path);
        }
    }
    let allocators = ordered(
        candidates
            .iter()
            .filter_map(|path| {
                Allocator::from_object(
                    path.to_string(),
                    host_path(pid, path),
                    Some(*path) == exe.as_deref(),
                )
            })
            .collect(),
    );
    if allocators.is_empty() {
        let searched = if candidates.is_empty() {
            format!("{} mapped objects (no libc among them)", maps.len())
        } else {
            candidates.join(", ")
        };
        return Err(Error::NoAllocator { pid, searched });
    }
    Ok(allocators)
}

/// The process's libc as an allocator (the calibration's probes go to bridge-trace's own).
pub fn libc_allocator(pid: u32, maps: &[Mapping]) -> Result<Allocator> {
    maps.iter()
        .find(|m| is_libc_name(&m.path))
        .and_then(|m| Allocator::from_object(m.path.clone(), host_path(pid, &m.path), false))
        .ok_or_else(|| Error::NoAllocator {
            pid,
            searched: "its maps (no libc)".into(),
        })
}

/// The allocator whose object holds a launched program's holds and the benchmark's floor: libc
/// when the program has one, else the statically linked one.
pub fn hold_allocator(allocators: &[Allocator]) -> &Allocator {
    allocators
        .iter()
        .find(|a| a.family == "glibc")
        .unwrap_or(&allocators[0])
}

/// `family (path)` of each, as `record` prints them and reports carry them.
pub fn describe(allocators: &[Allocator]) -> String {
    allocators
        .iter()
        .map(Allocator::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Replacements first, libc last.
fn ordered(mut allocators: Vec<Allocator>) -> Vec<Allocator> {
    allocators.sort_by_key(|a| a.family == "glibc");
    allocators
}

/// The allocators of a program about to be launched. It is not running yet, so this follows
/// what the dynamic loader will do: a dynamically linked program on this host maps the same
/// libc as bridge-trace itself, and the malloc replacements it needs (`DT_NEEDED`, found
/// through its RUNPATH, `LD_LIBRARY_PATH` and the system directories) or that `LD_PRELOAD`
/// names; any program may carry one linked statically.
pub fn allocators_for_command(program: &Path) -> Result<Vec<Allocator>> {
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
    refuse_go(program)?;
    let name = program.display().to_string();
    let own = Allocator::from_object(name.clone(), program.to_path_buf(), true);
    if !dynamic {
        return own.map(|a| vec![a]).ok_or_else(|| Error::NoAllocator {
            pid: 0,
            searched: format!("{name} (statically linked, no malloc/free symbols)"),
        });
    }
    let mut objects: Vec<PathBuf> = preloaded();
    objects.extend(needed_libraries(program, &data, |name| {
        may_allocate(name, None) && !is_libc_name(name)
    }));
    let libc = read_maps(std::process::id())?
        .into_iter()
        .find(|m| is_libc_name(&m.path))
        .ok_or_else(|| Error::NoAllocator {
            pid: 0,
            searched: "bridge-trace's own maps (no libc)".into(),
        })?;
    objects.push(PathBuf::from(&libc.path));
    let mut allocators: Vec<Allocator> = own.into_iter().collect();
    for path in objects {
        let shown = path.display().to_string();
        if allocators.iter().any(|a| a.path == shown) {
            continue;
        }
        allocators.extend(Allocator::from_object(shown, path, false));
    }
    if !allocators.iter().any(|a| a.family == "glibc") {
        return Err(Error::NoAllocator {
            pid: 0,
            searched: format!("{} (no malloc/free symbols)", libc.path),
        });
    }
    Ok(ordered(allocators))
}

/// The malloc replacements `LD_PRELOAD` names (paths, or names found as the loader would).
fn preloaded() -> Vec<PathBuf> {
    let Some(list) = std::env::var_os("LD_PRELOAD") else {
        return Vec::new();
    };
    list.to_string_lossy()
        .split([' ', ':'])
        .filter(|n| !n.is_empty() && may_allocate(n, None))
        .filter_map(|n| {
            if n.contains('/') {
                fs::canonicalize(n).ok()
            } else {
                find_library(n, &[])
            }
        })
        .collect()
}

/// The `DT_NEEDED` libraries of `program` that `wanted` picks by name, where the loader will
/// find them.
fn needed_libraries(program: &Path, data: &[u8], wanted: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    use object::read::elf::{Dyn as _, ElfFile64};
    let Ok(elf) = ElfFile64::<object::Endianness>::parse(data) else {
        return Vec::new();
    };
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let Ok(Some((entries, strings))) = sections.dynamic(endian, data) else {
        return Vec::new();
    };
    let Ok(strings) = sections.strings(endian, data, strings) else {
        return Vec::new();
    };
    const DT_NEEDED: i64 = 1;
    const DT_RPATH: i64 = 15;
    const DT_RUNPATH: i64 = 29;
    let origin = program.parent().unwrap_or(Path::new("/"));
    let mut needed = Vec::new();
    let mut search = Vec::new();
    for d in entries {
        let tag = d.d_tag(endian) as i64;
        let Ok(value) = d.string(endian, strings) else {
            continue;
        };
        let value = String::from_utf8_lossy(value);
        match tag {
            DT_NEEDED if wanted(&value) => needed.push(value.into_owned()),
            DT_RPATH | DT_RUNPATH => search.extend(
                value
                    .split(':')
                    .map(|dir| PathBuf::from(dir.replace("$ORIGIN", &origin.to_string_lossy()))),
            ),
            _ => {}
        }
    }
    needed
        .iter()
        .filter_map(|n| find_library(n, &search))
        .collect()
}

/// Where the loader finds library `name`: `dirs` (RUNPATH), `LD_LIBRARY_PATH`, then the
/// system's directories.
fn find_library(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let env: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    let system = [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/lib",
    ]
    .map(PathBuf::from);
    dirs.iter()
        .chain(&env)
        .chain(&system)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        // As /proc/PID/maps will show it (/lib is /usr/lib on a merged /usr).
        .map(|p| fs::canonicalize(&p).unwrap_or(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_libc() {
        let pid = std::process::id();
        let maps = read_maps(pid).unwrap();
        let all = find_allocators(pid, &maps).unwrap();
        let a = all.last().unwrap();
        assert!(a.path.contains("libc") && a.family == "glibc", "{a:?}");
        assert!(a.exit);
        for s in ["malloc", "free", "calloc", "realloc", "posix_memalign"] {
            assert!(
                a.entries.iter().any(|(x, _)| x == s),
                "{s} missing from {:?}",
                a.entries
            );
        }
        // glibc's aligned_alloc is memalign: one probe for both.
        assert!(a
            .aliases
            .iter()
            .any(|(x, _)| x == "aligned_alloc" || x == "memalign"));
    }

    #[test]
    fn libc_names() {
        assert!(is_libc_name("/usr/lib/x86_64-linux-gnu/libc.so.6"));
    }
}
