//! Names stack frames. [`ProcessMaps`] keeps every file mapping the target had while it was
//! traced, so frames are still resolved after it exits or unloads a library; [`Blazesym`] turns
//! (file, offset) into functions, source lines and inlined frames, with separate debug files
//! (`/usr/lib/debug/.build-id`, `.gnu_debuglink`, or fetched from debuginfod servers). Behind
//! the [`Symbolize`] trait so that the later stages can be tested from fixed input.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer,
};
use serde::{Deserialize, Serialize};

mod debuginfod;
pub use debuginfod::{Debuginfod, DebuginfodConfig};

use crate::{
    capture::{Location, Locator},
    model::maps::{hex, load_segments, readable_path, Module, ProcessMaps, Segment},
};

/// One named frame. A return address that cannot be named keeps its module and offset and has
/// no function (shown as `[unknown]`), never a guessed name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frame {
    pub function: Option<String>,
    /// Path of the object file, as the process saw it.
    pub module: Option<String>,
    /// File offset of the return address in `module`.
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Inlined into the frame below it (towards the root).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
}

impl Frame {
    pub fn unknown(module: Option<String>, offset: Option<u64>) -> Frame {
        Frame {
            function: None,
            module,
            offset,
            file: None,
            line: None,
            inlined: false,
        }
    }

    /// A frame that is a name only (a process, a kind of memory), at no address.
    pub fn named(name: String) -> Frame {
        Frame {
            function: Some(name),
            ..Frame::unknown(None, None)
        }
    }

    /// The frame's function, or `[unknown]`.
    /// The name with where it is, short: `f (file.c:12)`, or just the name.
    pub fn short_label(&self) -> String {
        let file = self
            .file
            .as_deref()
            .map(|f| f.rsplit('/').next().unwrap_or(f));
        match (file, self.line) {
            (Some(file), Some(line)) => format!("{} ({file}:{line})", self.display_name()),
            _ => self.display_name().to_string(),
        }
    }

    pub fn display_name(&self) -> &str {
        self.function.as_deref().unwrap_or("[unknown]")
    }

    /// The name in flamegraphs and folded stacks: the function, or for a frame that cannot be
    /// named, `module+0xOFFSET` (the module's file name), so that distinct functions of a
    /// stripped binary stay apart; `[unknown]` only where not even the module is known.
    pub fn folded_label(&self) -> std::borrow::Cow<'_, str> {
        match (&self.function, &self.module, self.offset) {
            (Some(f), _, _) => f.as_str().into(),
            (None, Some(module), Some(offset)) => format!(
                "{}+{offset:#x}",
                module.rsplit('/').next().unwrap_or(module)
            )
            .into(),
            _ => "[unknown]".into(),
        }
    }
}

/// Names the return addresses of one module, given as file offsets; each gives one frame or
/// several (inlining), outermost first.
pub trait Symbolize {
    fn symbolize(&mut self, module: &Module, offsets: &[u64]) -> Vec<Vec<Frame>>;
}

/// Names every location of `modules` once.
pub fn symbolize_locations(
    symbolizer: &mut dyn Symbolize,
    modules: &[Module],
    locations: impl IntoIterator<Item = Location>,
) -> HashMap<Location, Vec<Frame>> {
    let mut by_module: BTreeMap<Option<u32>, Vec<u64>> = BTreeMap::new();
    for l in locations {
        by_module.entry(l.module).or_default().push(l.offset);
    }
    let mut out = HashMap::new();
    for (module, mut offsets) in by_module {
        offsets.sort_unstable();
        offsets.dedup();
        let named = match module.and_then(|m| modules.get(m as usize)) {
            Some(m) => symbolizer.symbolize(m, &offsets),
            None => Vec::new(),
        };
        for (i, offset) in offsets.into_iter().enumerate() {
            let frames = named.get(i).cloned().unwrap_or_else(|| {
                vec![Frame::unknown(
                    module
                        .and_then(|m| modules.get(m as usize))
                        .map(|m| m.path.clone()),
                    module.map(|_| offset),
                )]
            });
            out.insert(Location { module, offset }, frames);
        }
    }
    out
}

/// Names return addresses of a live process, through its kept maps.
pub fn symbolize_addrs(
    symbolizer: &mut dyn Symbolize,
    maps: &ProcessMaps,
    addrs: &[u64],
) -> HashMap<u64, Vec<Frame>> {
    let mut locator = Locator::new(maps);
    let located: Vec<(u64, Location)> = addrs.iter().map(|&a| (a, locator.locate(a))).collect();
    let named = symbolize_locations(
        symbolizer,
        &locator.modules,
        located.iter().map(|(_, l)| *l),
    );
    located
        .into_iter()
        .map(|(addr, l)| (addr, named[&l].clone()))
        .collect()
}

/// Where the files behind the frames are read from.
enum Files {
    /// A traced process's files, through its root while it lives.
    Process(u32),
    /// This machine's files, or files found by build-id or name in these directories.
    Local(Vec<PathBuf>),
}

/// Symbolization with blazesym.
pub struct Blazesym {
    files: Files,
    symbolizer: Symbolizer,
    /// Modules whose frames could not be named, and why.
    unnamed: BTreeMap<String, (usize, String)>,
    /// Per file read: the public name of each internal alias (see [`public_names`]).
    public: HashMap<PathBuf, HashMap<String, String>>,
    /// Where debug files missing here are fetched from, if anywhere.
    debuginfod: Option<Debuginfod>,
    /// Modules debuginfod had no debug file for, and why.
    not_fetched: BTreeMap<String, String>,
}

impl Blazesym {
    /// For a process being traced: its files, as it sees them.
    pub fn process(maps: &ProcessMaps) -> Blazesym {
        Blazesym::with(Files::Process(maps.pid), None)
    }

    /// For a capture rendered later: this machine's files, checked against the build-ids
    /// recorded; `debug_dirs` are searched (before /usr/lib/debug) for files by build-id
    /// (`.build-id/ab/cdef….debug`), by path below them, and by file name.
    pub fn local(debug_dirs: &[PathBuf]) -> Blazesym {
        let mut dirs = debug_dirs.to_vec();
        dirs.extend(["/usr/lib/debug", "/lib/debug"].map(PathBuf::from));
        Blazesym::with(Files::Local(debug_dirs.to_vec()), Some(dirs))
    }

    fn with(files: Files, debug_dirs: Option<Vec<PathBuf>>) -> Blazesym {
        let symbolizer = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .set_debug_dirs(debug_dirs)
            .build();
        Blazesym {
            files,
            symbolizer,
            unnamed: BTreeMap::new(),
            public: HashMap::new(),
            debuginfod: None,
            not_fetched: BTreeMap::new(),
        }
    }

    /// Also names frames from the debug files `debuginfod` fetches, for the modules with a
    /// build-id whose frames have no name or no line here.
    pub fn with_debuginfod(mut self, debuginfod: Option<Debuginfod>) -> Blazesym {
        self.debuginfod = debuginfod;
        self
    }

    /// Modules whose debug file debuginfod did not give, and why: (module, why), in module
    /// order.
    pub fn not_fetched(&self) -> Vec<(String, String)> {
        self.not_fetched
            .iter()
            .map(|(m, why)| (m.clone(), why.clone()))
            .collect()
    }

    /// Modules whose frames stayed unnamed: (module, frames, why), in module order.
    pub fn unnamed(&self) -> Vec<(String, usize, String)> {
        self.unnamed
            .iter()
            .map(|(m, (n, why))| (m.clone(), *n, why.clone()))
            .collect()
    }

    /// The file to read for `module`, or why there is none.
    fn file(&self, module: &Module) -> Result<PathBuf, String> {
        let dirs = match &self.files {
            Files::Process(pid) => return Ok(readable_path(*pid, &module.path)),
            Files::Local(dirs) => dirs,
        };
        let matches = |path: &Path| match &module.build_id {
            None => true,
            Some(want) => blazesym::helper::read_elf_build_id(path)
                .ok()
                .flatten()
                .is_some_and(|id| hex(&id) == *want),
        };
        let here = PathBuf::from(&module.path);
        let mut candidates = Vec::new();
        for dir in dirs {
            if let Some(id) = module.build_id.as_deref() {
                candidates.extend(by_build_id(dir, id));
            }
            candidates.push(dir.join(module.path.trim_start_matches('/')));
            if let Some(name) = here.file_name() {
                candidates.push(dir.join(name));
            }
        }
        candidates.push(here.clone());
        if let Some(found) = candidates.iter().find(|p| p.is_file() && matches(p)) {
            return Ok(found.clone());
        }
        // A file of that name in --debug-dir, but of another build.
        let other_build = candidates
            .iter()
            .filter(|p| **p != here && p.is_file())
            .find_map(|p| {
                let id = blazesym::helper::read_elf_build_id(p).ok().flatten()?;
                Some((p.clone(), hex(&id)))
            });
        if let Some((path, id)) = other_build {
            return Err(format!(
                "{} is another build of {} (build-id {id}, the recording's is {}); pass \
                 --debug-dir with the original or its debug file",
                path.display(),
                module.path,
                module.build_id.as_deref().unwrap_or("?")
            ));
        }
        Err(if here.is_file() {
            format!(
                "{} on this machine is another build (build-id {}); pass --debug-dir with the \
                 original or its debug file",
                module.path,
                module.build_id.as_deref().unwrap_or("?")
            )
        } else {
            format!(
                "{} is not on this machine; pass --debug-dir with it or its debug file{}",
                module.path,
                module
                    .build_id
                    .as_deref()
                    .map(|id| format!(" (build-id {id})"))
                    .unwrap_or_default()
            )
        })
    }
}

/// The public name of each internal alias in `files` (an object and its separate debug file),
/// by the alias's name (a symbolizer does not always say the address it found a name at): glibc calls its own functions
/// through hidden aliases (`__GI___strdup`, `__GI__IO_file_doallocate`, `__libc_free`), which is
/// the name a symbolizer finds first, where every other tool (valgrind, gdb's backtrace of a
/// caller, the manual) says `strdup`, `_IO_file_doallocate`, `free`. Among the function
/// symbols at one address: no `__GI_` alias, global or weak over local, the fewest leading
/// underscores, then the shortest. A name given to functions at two addresses is left alone.
pub fn public_names(files: &[PathBuf]) -> HashMap<String, String> {
    use object::{Object as _, ObjectSymbol as _, SymbolKind};
    let mut at: HashMap<u64, Vec<(bool, String)>> = HashMap::new();
    for path in files {
        let Ok(data) = std::fs::read(path) else {
            continue;
        };
        let Ok(obj) = object::File::parse(&*data) else {
            continue;
        };
        for sym in obj.symbols().chain(obj.dynamic_symbols()) {
            if sym.kind() != SymbolKind::Text || sym.address() == 0 {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            if name.is_empty() || name.contains('@') {
                continue;
            }
            let names = at.entry(sym.address()).or_default();
            if !names.iter().any(|(_, n)| n == name) {
                names.push((sym.is_global(), name.to_string()));
            }
        }
    }
    let mut public: HashMap<String, String> = HashMap::new();
    let mut ambiguous: Vec<String> = Vec::new();
    for names in at.into_values() {
        let mut best: Vec<&(bool, String)> = names
            .iter()
            .filter(|(_, n)| !n.starts_with("__GI_"))
            .collect();
        best.sort_by_key(|(global, n)| {
            (
                !global,
                n.len() - n.trim_start_matches('_').len(),
                n.len(),
                n.clone(),
            )
        });
        let Some((_, best)) = best.first() else {
            continue;
        };
        for (_, n) in &names {
            match public.get(n) {
                Some(other) if other != best => ambiguous.push(n.clone()),
                _ => {
                    public.insert(n.clone(), best.clone());
                }
            }
        }
    }
    for n in ambiguous {
        public.remove(&n);
    }
    public.retain(|alias, name| alias != name);
    public
}

/// [`public_names`] of the object at `path` and its debug file under /usr/lib/debug.
pub fn public_names_of(path: &Path) -> HashMap<String, String> {
    let module = Module {
        path: path.display().to_string(),
        build_id: None,
        ..Default::default()
    };
    public_names_in(&module, path)
}

/// [`public_names`] of `module`, read at `file`, and of its debug file.
fn public_names_in(module: &Module, file: &Path) -> HashMap<String, String> {
    let mut files = vec![file.to_path_buf()];
    files.extend(debug_file(module, file));
    public_names(&files)
}

/// The separate debug file of `module` (read at `file`) under /usr/lib/debug, by build-id.
fn debug_file(module: &Module, file: &Path) -> Vec<PathBuf> {
    let id = module.build_id.clone().or_else(|| {
        blazesym::helper::read_elf_build_id(file)
            .ok()
            .flatten()
            .map(|id| hex(&id))
    });
    id.map(|id| by_build_id(Path::new("/usr/lib/debug"), &id))
        .unwrap_or_default()
        .into_iter()
        .take(1)
        .collect()
}

/// Where a debug directory keeps the files of build-id `id`: `.build-id/ab/cdef….debug` (a
/// separate debug file), then `.build-id/ab/cdef…` (the object itself); none for an id too
/// short to split.
fn by_build_id(dir: &Path, id: &str) -> Vec<PathBuf> {
    if id.len() <= 2 {
        return Vec::new();
    }
    let by_id = dir.join(".build-id").join(&id[..2]);
    vec![
        by_id.join(format!("{}.debug", &id[2..])),
        by_id.join(&id[2..]),
    ]
}

fn code_location(ci: Option<&blazesym::symbolize::CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match ci {
        Some(ci) => {
            let path = match &ci.dir {
                Some(dir) if !dir.as_os_str().is_empty() => dir.join(&*ci.file),
                _ => PathBuf::from(&*ci.file),
            };
            (Some(path.to_string_lossy().into_owned()), ci.line)
        }
        None => (None, None),
    }
}

/// `name` as found in `file` (`module`'s), or its public name when it is an internal alias (C
/// names start with `_` when they are one); `cache` keeps each file's aliases.
fn public_name(
    cache: &mut HashMap<PathBuf, HashMap<String, String>>,
    module: &Module,
    file: &Path,
    name: &str,
) -> String {
    if !name.starts_with('_') {
        return name.to_string();
    }
    let public = cache
        .entry(file.to_path_buf())
        .or_insert_with(|| public_names_in(module, file));
    public
        .get(name)
        .cloned()
        .unwrap_or_else(|| name.to_string())
}

impl Blazesym {
    /// Names `addrs` (file offsets, or addresses as the ELF file gives them when `virt`) in
    /// `file`, `module`'s object or its debug file: one frame list per address, `None` where
    /// it has no symbol.
    fn named_in(
        &mut self,
        module: &Module,
        file: &Path,
        addrs: &[u64],
        virt: bool,
    ) -> Result<Vec<Option<Vec<Frame>>>, String> {
        let src = Source::Elf(Elf::new(file));
        let input = if virt {
            Input::VirtOffset(addrs)
        } else {
            Input::FileOffset(addrs)
        };
        let results = self
            .symbolizer
            .symbolize(&src, input)
            .map_err(|e| e.to_string())?;
        let path = Some(module.path.clone());
        Ok(results
            .iter()
            .map(|r| {
                let Symbolized::Sym(sym) = r else {
                    return None;
                };
                let mut frames = Vec::with_capacity(1 + sym.inlined.len());
                // blazesym gives each frame its own line: the outer function's is where it
                // calls the first inlined one, and so on down to the address.
                let (src_file, line) = code_location(sym.code_info.as_deref());
                frames.push(Frame {
                    function: Some(public_name(&mut self.public, module, file, &sym.name)),
                    module: path.clone(),
                    // The caller gives each frame its return address's file offset.
                    offset: None,
                    file: src_file,
                    line,
                    inlined: false,
                });
                for f in sym.inlined.iter() {
                    let (src_file, line) = code_location(f.code_info.as_ref());
                    frames.push(Frame {
                        function: Some(public_name(&mut self.public, module, file, &f.name)),
                        module: path.clone(),
                        offset: None,
                        file: src_file,
                        line,
                        inlined: true,
                    });
                }
                Some(frames)
            })
            .collect())
    }

    /// Names, from the debug file debuginfod has for `module`, the frames of `named` that
    /// have no name or no line. The module's segments (`object`'s, the module's own file,
    /// when the capture has none) turn the stack's file offsets into the addresses the debug
    /// file speaks in.
    fn name_by_debuginfod(
        &mut self,
        module: &Module,
        object: Option<&Path>,
        calls: &[u64],
        named: &mut [Option<Vec<Frame>>],
    ) {
        let (Some(debuginfod), Some(id)) = (self.debuginfod.as_mut(), module.build_id.as_deref())
        else {
            return;
        };
        let wanting: Vec<usize> = (0..calls.len())
            .filter(|&i| named[i].as_ref().is_none_or(|f| f[0].line.is_none()))
            .collect();
        if wanting.is_empty() {
            return;
        }
        // A debug file keeps the object's segments without their file offsets: the capture's
        // record of them places the stack's offsets, else the object itself when it is here.
        let segments = match (module.segments.is_empty(), object) {
            (false, _) => module.segments.clone(),
            (true, Some(object)) => load_segments(object),
            (true, None) => Vec::new(),
        };
        if segments.is_empty() {
            return;
        }
        let debug = match debuginfod.debug_file(id) {
            Ok(debug) => debug,
            Err(why) => {
                self.not_fetched
                    .insert(module.path.clone(), format!("build-id {id}: {why}"));
                return;
            }
        };
        let (at, addrs): (Vec<usize>, Vec<u64>) = wanting
            .into_iter()
            .filter_map(|i| Some((i, Segment::vaddr_of(&segments, calls[i])?)))
            .unzip();
        match self.named_in(module, &debug, &addrs, true) {
            Ok(better) => {
                for (i, frames) in at.into_iter().zip(better) {
                    if frames.is_some() {
                        named[i] = frames;
                    }
                }
            }
            Err(e) => {
                self.not_fetched
                    .insert(module.path.clone(), format!("build-id {id}: {e}"));
            }
        }
    }
}

impl Symbolize for Blazesym {
    fn symbolize(&mut self, module: &Module, offsets: &[u64]) -> Vec<Vec<Frame>> {
        // The byte before each return address is in the call instruction: so the line is the
        // call's, and a call at a function's very end is not blamed on the next function.
        let calls: Vec<u64> = offsets.iter().map(|off| off.saturating_sub(1)).collect();
        let mut named: Vec<Option<Vec<Frame>>> = vec![None; offsets.len()];
        let mut why = None;
        let file = self.file(module);
        match &file {
            Ok(file) => match self.named_in(module, file, &calls, false) {
                Ok(found) => named = found,
                Err(e) => why = Some(e),
            },
            Err(e) => why = Some(e.clone()),
        }
        self.name_by_debuginfod(module, file.as_deref().ok(), &calls, &mut named);
        let left = named.iter().filter(|f| f.is_none()).count();
        if let (Some(why), true) = (why, left > 0) {
            self.unnamed.insert(module.path.clone(), (left, why));
        }
        named
            .into_iter()
            .zip(offsets)
            .map(|(frames, &off)| match frames {
                Some(mut frames) => {
                    for f in &mut frames {
                        f.offset = Some(off);
                    }
                    frames
                }
                None => vec![Frame::unknown(Some(module.path.clone()), Some(off))],
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    #[no_mangle]
    extern "C" fn bridge_trace_symbolize_probe_fn() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn names_a_function_of_this_test_binary() {
        let pid = std::process::id();
        let maps = ProcessMaps::new(pid, crate::model::maps::read_maps(pid).unwrap());
        let addr = bridge_trace_symbolize_probe_fn as *const () as u64 + 1;
        let mut s = Blazesym::process(&maps);
        let frames = symbolize_addrs(&mut s, &maps, &[addr, 8]);
        let f = &frames[&addr];
        assert_eq!(
            f[0].function.as_deref(),
            Some("bridge_trace_symbolize_probe_fn"),
            "{f:?}"
        );
        assert!(f[0].module.as_deref().unwrap().contains("bridge_trace"));
        assert_eq!(frames[&8], vec![Frame::unknown(None, None)]);
    }
}
