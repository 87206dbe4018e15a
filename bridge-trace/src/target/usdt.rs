//! The OpenTelemetry `otel_memory` USDT contract in a process's objects: every probe site of
//! the provider in each executable mapping (`.note.stapsdt`: name, place, semaphore and SDT
//! argument descriptors), found in the files the process maps, through `/proc/PID/root`.
use std::path::{Path, PathBuf};

use bridge_trace_common::{pt_regs_slot, usdt_arg, UsdtArg, UsdtSpec, MAX_USDT_ARGS};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::{file_offset, map_file};
use crate::model::maps::{host_path, Mapping};

/// The contract's provider.
pub const PROVIDER: &str = "otel_memory";
/// The probes of the contract bridge-trace reads, and how many arguments each has.
pub const PROBES: &[(&str, usize)] = &[("alloc", 3), ("free", 1)];

/// One probe site of the contract in an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// `alloc` or `free`.
    pub name: String,
    /// File offset of the site's instruction.
    pub offset: u64,
    /// File offset of its semaphore, if it has one (the kernel raises it while a probe is
    /// attached).
    pub semaphore: Option<u64>,
    /// Where its arguments are.
    pub spec: UsdtSpec,
}

/// An object of a process that carries the contract.
#[derive(Clone, Debug)]
pub struct Carrier {
    /// The object as the process sees it.
    pub path: String,
    pub host_path: PathBuf,
    pub sites: Vec<Site>,
    /// It defines `malloc` (an interposing sampler such as bridge-trace's own): its frames at
    /// the top of a sample's stack are the sampler's, not the program's.
    pub interposes: bool,
    /// Sites of the provider that could not be read (an argument form bridge-trace does not
    /// decode, a probe of the contract with the wrong arity): each said once.
    pub skipped: Vec<String>,
}

/// The objects of `pid` (its `maps`) that report samples through the contract (an `alloc`
/// site at least), each once. The sites that could not be read are in each one's `skipped`.
pub fn carriers(pid: u32, maps: &[Mapping]) -> Vec<Carrier> {
    all_carriers(pid, maps)
        .into_iter()
        .filter(Carrier::reports)
        .collect()
}

/// The `objects` (as a program to be launched will see them, and where they are) that report
/// samples through the contract.
pub fn carriers_in(objects: &[(String, PathBuf)]) -> Vec<Carrier> {
    objects
        .iter()
        .filter_map(|(path, host)| carrier(path, host))
        .filter(Carrier::reports)
        .collect()
}

impl Carrier {
    /// Whether it reports samples: it has an `alloc` site.
    fn reports(&self) -> bool {
        self.sites.iter().any(|s| s.name == "alloc")
    }
}

/// What a start line says of the objects a process reports through: `the otel_memory probes
/// of libbridge_trace_sampler.so (2 sites)`.
pub fn describe(carriers: &[Carrier], sites: usize) -> String {
    let names: Vec<&str> = carriers
        .iter()
        .map(|c| c.path.rsplit('/').next().unwrap_or(&c.path))
        .collect();
    format!(
        "the {PROVIDER} probes of {} ({sites} sites)",
        names.join(", ")
    )
}

/// What to say of the sites of `carriers` that could not be read: a line each.
pub fn skipped(carriers: &[Carrier]) -> impl Iterator<Item = String> + '_ {
    carriers.iter().flat_map(|c| {
        c.skipped
            .iter()
            .map(move |why| format!("{}: skipping {why}", c.path))
    })
}

/// The 5-byte nop a USDT site should be (`nopl 0x0(%rax,%rax,1)`): the kernel emulates it, and
/// since 6.18 turns it into a call; a shorter nop it single-steps.
pub const SITE_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// The objects among `carriers` that interpose the allocator, as the process sees them.
pub fn interposers(carriers: &[Carrier]) -> Vec<String> {
    carriers
        .iter()
        .filter(|c| c.interposes)
        .map(|c| c.path.clone())
        .collect()
}

/// Every object of `pid` with a site of the provider, readable or not.
fn all_carriers(pid: u32, maps: &[Mapping]) -> Vec<Carrier> {
    let mut seen: Vec<&str> = Vec::new();
    let mut found = Vec::new();
    for m in maps
        .iter()
        .filter(|m| m.executable && m.path.starts_with('/'))
    {
        if seen.contains(&m.path.as_str()) {
            continue;
        }
        seen.push(&m.path);
        let host = host_path(pid, &m.path);
        if let Some(c) = carrier(&m.path, &host) {
            found.push(c);
        }
    }
    found
}

/// The contract's sites in the object at `host` (seen by the process as `path`), if it has any.
pub fn carrier(path: &str, host: &Path) -> Option<Carrier> {
    let data = map_file(host)?;
    let elf = object::File::parse(&*data).ok()?;
    let notes = notes(&elf)?;
    let mut sites = Vec::new();
    let mut skipped = Vec::new();
    // prelink moves an object after its notes were written: the base section says by how much.
    let base = elf
        .section_by_name(".stapsdt.base")
        .map(|s| s.address())
        .unwrap_or(0);
    for n in notes.into_iter().filter(|n| n.provider == PROVIDER) {
        let Some(&(_, arity)) = PROBES.iter().find(|(name, _)| *name == n.name) else {
            continue;
        };
        let pc = n.pc.wrapping_add(base.wrapping_sub(n.base));
        let read = || -> Result<Site, String> {
            let offset = file_offset(&elf, pc).ok_or("its address is in no segment")?;
            let semaphore = match n.semaphore {
                0 => None,
                s => Some(file_offset(&elf, s).ok_or("its semaphore is in no segment")?),
            };
            let args: Vec<&str> = n.args.split_whitespace().collect();
            if args.len() < arity {
                return Err(format!("{} arguments ({arity} expected)", args.len()));
            }
            let mut spec = UsdtSpec::default();
            for (slot, a) in spec.args.iter_mut().zip(&args[..arity.min(MAX_USDT_ARGS)]) {
                *slot = parse_arg(a, pc, &|sym| symbol(&elf, sym))?;
            }
            Ok(Site {
                name: n.name.clone(),
                offset,
                semaphore,
                spec,
            })
        };
        match read() {
            Ok(site) => sites.push(site),
            Err(why) => skipped.push(format!("{PROVIDER}:{} at {pc:#x}: {why}", n.name)),
        }
    }
    if sites.is_empty() && skipped.is_empty() {
        return None;
    }
    let interposes = elf
        .dynamic_symbols()
        .any(|s| s.is_definition() && s.name() == Ok("malloc"));
    Some(Carrier {
        path: path.to_string(),
        host_path: host.to_path_buf(),
        sites,
        interposes,
        skipped,
    })
}

/// One `stapsdt` note.
#[derive(Debug)]
struct Note {
    pc: u64,
    base: u64,
    semaphore: u64,
    provider: String,
    name: String,
    args: String,
}

const NT_STAPSDT: u32 = 3;

/// The `stapsdt` notes of an object (`None`: it has none).
fn notes(elf: &object::File<'_>) -> Option<Vec<Note>> {
    let section = elf.section_by_name(".note.stapsdt")?;
    let data = section.data().ok()?;
    let mut notes = Vec::new();
    // Each note: namesz, descsz, type (u32 each), the name padded to 4, the desc padded to 4.
    let mut at = 0usize;
    let u32_at = |i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(i..i + 4)?.try_into().ok()?))
    };
    while at + 12 <= data.len() {
        let namesz = u32_at(at)? as usize;
        let descsz = u32_at(at + 4)? as usize;
        let kind = u32_at(at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at + namesz.next_multiple_of(4);
        let next = desc_at + descsz.next_multiple_of(4);
        let name = data.get(name_at..name_at + namesz)?;
        let desc = data.get(desc_at..desc_at + descsz)?;
        at = next;
        if kind != NT_STAPSDT || name != b"stapsdt\0" || desc.len() < 24 {
            continue;
        }
        let word = |i: usize| u64::from_le_bytes(desc[i * 8..i * 8 + 8].try_into().unwrap());
        let mut strings = desc[24..]
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned());
        notes.push(Note {
            pc: word(0),
            base: word(1),
            semaphore: word(2),
            provider: strings.next().unwrap_or_default(),
            name: strings.next().unwrap_or_default(),
            args: strings.next().unwrap_or_default(),
        });
    }
    Some(notes)
}

/// The link-time address of symbol `name` of an object.
fn symbol(elf: &object::File<'_>, name: &str) -> Option<u64> {
    elf.symbols()
        .chain(elf.dynamic_symbols())
        .find(|s| s.is_definition() && s.name() == Ok(name))
        .map(|s| s.address())
}

/// Decodes one SDT argument descriptor of a site at link-time address `pc`: `SIZE@OPERAND`,
/// the size in bytes (negative: signed), the operand in AT&T syntax: `%reg`, `$imm`,
/// `disp(%reg)`, or `symbol+disp(%rip)` for a global (`symbol` resolves link-time names).
pub fn parse_arg(
    desc: &str,
    pc: u64,
    symbol: &dyn Fn(&str) -> Option<u64>,
) -> Result<UsdtArg, String> {
    let bad = |why: &str| format!("argument {desc:?}: {why}");
    let (size, operand) = match desc.split_once('@') {
        Some((s, o)) => (s.parse::<i32>().map_err(|_| bad("bad size"))?, o),
        None => (8, desc),
    };
    if ![1, 2, 4, 8].contains(&size.unsigned_abs()) {
        return Err(bad("bad size"));
    }
    let mut arg = UsdtArg {
        size,
        ..UsdtArg::default()
    };
    if let Some(imm) = operand.strip_prefix('$') {
        arg.kind = usdt_arg::CONST;
        arg.value = parse_int(imm).ok_or_else(|| bad("bad constant"))?;
    } else if let Some(reg) = operand.strip_prefix('%') {
        arg.kind = usdt_arg::REG;
        arg.reg = register(reg).ok_or_else(|| bad("unknown register"))? as u32;
    } else if let Some((disp, rest)) = operand.split_once('(') {
        let reg = rest
            .strip_suffix(')')
            .and_then(|r| r.strip_prefix('%'))
            .ok_or_else(|| bad("unsupported operand"))?;
        let slot = register(reg).ok_or_else(|| bad("unknown or indexed register"))?;
        arg.kind = usdt_arg::DEREF;
        arg.reg = slot as u32;
        arg.value = if disp.is_empty() {
            0
        } else if let Some(d) = parse_int(disp) {
            d
        } else if slot == pt_regs_slot::RIP {
            // A global: the register is the site's own address when the probe hits.
            let (name, off) = match disp.find(['+', '-']) {
                Some(i) => (
                    &disp[..i],
                    parse_int(&disp[i..]).ok_or_else(|| bad("bad offset"))?,
                ),
                None => (disp, 0),
            };
            let at = symbol(name).ok_or_else(|| bad("unknown symbol"))?;
            (at as i64).wrapping_add(off).wrapping_sub(pc as i64)
        } else {
            return Err(bad("bad displacement"));
        };
    } else {
        return Err(bad("unsupported operand"));
    }
    Ok(arg)
}

fn parse_int(s: &str) -> Option<i64> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = match s.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => s.parse::<i64>().ok()?,
    };
    Some(if neg { -v } else { v })
}

/// The `pt_regs` slot of an x86-64 register by any of its names (`rdi`, `edi`, `di`, `dil`,
/// `r8d`, …); the high-byte registers (`ah`) are not readable this way.
fn register(name: &str) -> Option<u64> {
    use pt_regs_slot::*;
    let legacy = [
        (["rax", "eax", "ax", "al"], RAX),
        (["rbx", "ebx", "bx", "bl"], RBX),
        (["rcx", "ecx", "cx", "cl"], RCX),
        (["rdx", "edx", "dx", "dl"], RDX),
        (["rsi", "esi", "si", "sil"], RSI),
        (["rdi", "edi", "di", "dil"], RDI),
        (["rbp", "ebp", "bp", "bpl"], RBP),
        (["rsp", "esp", "sp", "spl"], RSP),
    ];
    if let Some((_, slot)) = legacy.iter().find(|(names, _)| names.contains(&name)) {
        return Some(*slot);
    }
    if name == "rip" {
        return Some(RIP);
    }
    let n = name.strip_prefix('r')?;
    let digits = n.trim_end_matches(['d', 'w', 'b']);
    if n.len() - digits.len() > 1 {
        return None;
    }
    Some(match digits.parse::<u32>().ok()? {
        8 => R8,
        9 => R9,
        10 => R10,
        11 => R11,
        12 => R12,
        13 => R13,
        14 => R14,
        15 => R15,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(desc: &str) -> Result<UsdtArg, String> {
        parse_arg(desc, 0x1000, &|s| (s == "counter").then_some(0x4010))
    }

    #[test]
    fn descriptors_decode_as_gcc_and_rustc_write_them() {
        let a = arg("8@%rdi").unwrap();
        assert_eq!(
            (a.kind, a.reg, a.size),
            (usdt_arg::REG, pt_regs_slot::RDI as u32, 8)
        );
        let a = arg("-4@%r8d").unwrap();
        assert_eq!(
            (a.kind, a.reg, a.size),
            (usdt_arg::REG, pt_regs_slot::R8 as u32, -4)
        );
        let a = arg("8@-24(%rbp)").unwrap();
        assert_eq!(
            (a.kind, a.reg, a.value),
            (usdt_arg::DEREF, pt_regs_slot::RBP as u32, -24)
        );
        let a = arg("-4@$42").unwrap();
        assert_eq!((a.kind, a.value), (usdt_arg::CONST, 42));
        let a = arg("8@(%rax)").unwrap();
        assert_eq!((a.kind, a.value), (usdt_arg::DEREF, 0));
        // A global, relative to the site: 0x4010 + 8 - 0x1000.
        let a = arg("8@counter+8(%rip)").unwrap();
        assert_eq!(
            (a.kind, a.reg, a.value),
            (usdt_arg::DEREF, pt_regs_slot::RIP as u32, 0x3018)
        );
    }

    #[test]
    fn forms_it_cannot_read_are_refused_with_the_descriptor() {
        for bad in [
            "8@%ah",
            "8@(%rax,%rbx,8)",
            "3@%rdi",
            "8@nosuch(%rip)",
            "8@%xmm0",
            "x@%rdi",
        ] {
            let e = arg(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
