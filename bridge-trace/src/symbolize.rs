//! Names stack frames. [`ProcessMaps`] keeps every file mapping the target had while it was
//! traced, so frames are still resolved after it exits or unloads a library; [`Blazesym`] turns
//! (file, offset) into functions, source lines and inlined frames, with separate debug files
//! (`/usr/lib/debug/.build-id`, `.gnu_debuglink`). Behind the [`Symbolize`] trait so that the
//! later stages can be tested from fixed input.
use std::{collections::HashMap, path::PathBuf};

use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Symbolized, Symbolizer,
};
use serde::{Deserialize, Serialize};

use crate::target::{self, Mapping};

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

    /// The name shown in flamegraphs and folded stacks.
    pub fn display_name(&self) -> &str {
        self.function.as_deref().unwrap_or("[unknown]")
    }
}

/// The file mappings a process had at any time while traced; newer ones win on overlap.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    pub pid: u32,
    pub mappings: Vec<Mapping>,
    /// The mappings as last read (without those since unmapped).
    pub current: Vec<Mapping>,
}

impl ProcessMaps {
    pub fn new(pid: u32, mappings: Vec<Mapping>) -> ProcessMaps {
        ProcessMaps {
            pid,
            current: mappings.clone(),
            mappings,
        }
    }

    /// Re-reads `/proc/PID/maps`, keeping what was seen before. False when the process is gone.
    pub fn refresh(&mut self) -> bool {
        match target::read_maps(self.pid) {
            Ok(current) if !current.is_empty() => {
                for m in &current {
                    if !self.mappings.contains(m) {
                        self.mappings.push(m.clone());
                    }
                }
                self.current = current;
                true
            }
            _ => false,
        }
    }

    /// The newest mapping that contains `addr`.
    pub fn lookup(&self, addr: u64) -> Option<&Mapping> {
        self.mappings
            .iter()
            .rev()
            .find(|m| m.start <= addr && addr < m.end)
    }
}

/// Turns return addresses into frames; one address may give several frames (inlining), listed
/// outermost first.
pub trait Symbolize {
    fn symbolize(&mut self, addrs: &[u64]) -> HashMap<u64, Vec<Frame>>;
}

/// Symbolization with blazesym, from the kept process maps.
pub struct Blazesym<'a> {
    maps: &'a ProcessMaps,
    symbolizer: Symbolizer,
}

impl<'a> Blazesym<'a> {
    pub fn new(maps: &'a ProcessMaps) -> Blazesym<'a> {
        let symbolizer = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Blazesym { maps, symbolizer }
    }

    /// Where the file behind a mapping can be read now: through the process's root while it
    /// lives (container-aware), else at its own path.
    fn readable_path(&self, path: &str) -> PathBuf {
        let through_root = target::host_path(self.maps.pid, path);
        if through_root.exists() {
            through_root
        } else {
            PathBuf::from(path)
        }
    }
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

impl Symbolize for Blazesym<'_> {
    fn symbolize(&mut self, addrs: &[u64]) -> HashMap<u64, Vec<Frame>> {
        let mut out = HashMap::new();
        // Group by object file, as file offsets of the byte before each return address (the
        // call instruction), so that the line is the call's and a call at a function's very end
        // is not blamed on the next function.
        let mut by_file: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for &addr in addrs {
            match self.maps.lookup(addr) {
                Some(m) => by_file
                    .entry(m.path.as_str())
                    .or_default()
                    .push((addr, addr - m.start + m.offset)),
                None => {
                    out.insert(addr, vec![Frame::unknown(None, None)]);
                }
            }
        }
        for (path, items) in by_file {
            let offsets: Vec<u64> = items.iter().map(|(_, off)| off.saturating_sub(1)).collect();
            let src = Source::Elf(Elf::new(self.readable_path(path)));
            let results = self
                .symbolizer
                .symbolize(&src, Input::FileOffset(&offsets))
                .unwrap_or_default();
            for (i, &(addr, off)) in items.iter().enumerate() {
                let module = Some(path.to_string());
                let frames = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => {
                        let mut frames = Vec::with_capacity(1 + sym.inlined.len());
                        // blazesym gives each frame its own line: the outer function's is
                        // where it calls the first inlined one, and so on down to the address.
                        let (file, line) = code_location(sym.code_info.as_deref());
                        frames.push(Frame {
                            function: Some(sym.name.to_string()),
                            module: module.clone(),
                            offset: Some(off),
                            file,
                            line,
                            inlined: false,
                        });
                        for f in sym.inlined.iter() {
                            let (file, line) = code_location(f.code_info.as_ref());
                            frames.push(Frame {
                                function: Some(f.name.to_string()),
                                module: module.clone(),
                                offset: Some(off),
                                file,
                                line,
                                inlined: true,
                            });
                        }
                        frames
                    }
                    _ => vec![Frame::unknown(module, Some(off))],
                };
                out.insert(addr, frames);
            }
        }
        out
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
        let maps = ProcessMaps::new(pid, target::read_maps(pid).unwrap());
        let addr = bridge_trace_symbolize_probe_fn as *const () as u64 + 1;
        let mut s = Blazesym::new(&maps);
        let frames = s.symbolize(&[addr, 8]);
        let f = &frames[&addr];
        assert_eq!(
            f[0].function.as_deref(),
            Some("bridge_trace_symbolize_probe_fn"),
            "{f:?}"
        );
        assert!(f[0].module.as_deref().unwrap().contains("bridge_trace"));
        assert_eq!(frames[&8], vec![Frame::unknown(None, None)]);
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
}
