//! Compiles one ELF object's call-frame information (`.eh_frame`, and `.debug_frame` where it
//! covers code `.eh_frame` does not) into the flat, sorted rows the kernel half searches: for
//! each address range, where the CFA is and where the caller's rbp was saved.
use std::time::{Duration, Instant};

use bridge_trace_common::{cfa_rule, rbp_rule, UnwindPage, UnwindRule, UNWIND_PAGE_SHIFT};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, LittleEndian, RegisterRule,
    UnwindContext, UnwindSection, UnwindTableRow, X86_64,
};
use object::{Object as _, ObjectSection as _};

/// A compiled table, addresses relative to the object's own virtual addresses.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub rows: Vec<CompiledRow>,
    pub stats: TableStats,
}

impl Table {
    /// The page index of the table: (first page, entries), entry `i` holding the rows to
    /// search for an address in page `first + i` (table-relative row numbers).
    pub fn page_index(&self) -> (u32, Vec<UnwindPage>) {
        let (Some(first), Some(last)) = (self.rows.first(), self.rows.last()) else {
            return (0, Vec::new());
        };
        let (first, last) = (first.pc >> UNWIND_PAGE_SHIFT, last.pc >> UNWIND_PAGE_SHIFT);
        let covering = |page: u32| {
            let start = page << UNWIND_PAGE_SHIFT;
            self.rows
                .partition_point(|r| r.pc <= start)
                .saturating_sub(1) as u32
        };
        let index = (first..=last)
            .map(|page| UnwindPage {
                first: covering(page),
                last: covering(page + 1),
            })
            .collect();
        (first, index)
    }
}

/// What compiling one object found and cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct TableStats {
    /// Functions described (FDEs).
    pub fdes: usize,
    /// Rows whose CFA rule the kernel half cannot evaluate (those frames end a walk).
    pub unsupported: usize,
    pub build_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("not an ELF object: {0}")]
    Elf(#[from] object::Error),
    #[error("bad call-frame information: {0}")]
    Cfi(#[from] gimli::Error),
    #[error("code above 4 GiB ({0:#x}) is not supported")]
    TooHigh(u64),
}

type Rule = UnwindRule;

const NO_RULE: Rule = Rule {
    cfa_rule: cfa_rule::NONE,
    rbp_rule: rbp_rule::SAME,
    _pad: 0,
    cfa_offset: 0,
    rbp_offset: 0,
    _pad2: 0,
};

/// One row of a compiled table: `rule` from `pc` up to the next row's `pc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompiledRow {
    pub pc: u32,
    pub rule: UnwindRule,
}

/// Compiles the unwind table of the ELF object in `data`.
pub fn compile(data: &[u8]) -> Result<Table, CompileError> {
    let started = Instant::now();
    let file = object::File::parse(data)?;
    let mut bases = BaseAddresses::default();
    if let Some(s) = file.section_by_name(".text") {
        bases = bases.set_text(s.address());
    }
    if let Some(s) = file.section_by_name(".got") {
        bases = bases.set_got(s.address());
    }
    if let Some(s) = file.section_by_name(".eh_frame_hdr") {
        bases = bases.set_eh_frame_hdr(s.address());
    }
    let mut ranges: Vec<(u64, u64, Rule)> = Vec::new();
    let mut stats = TableStats::default();
    if let Some(s) = file.section_by_name(".eh_frame") {
        let eh_bases = bases.clone().set_eh_frame(s.address());
        let section = EhFrame::new(s.data()?, LittleEndian);
        collect(&section, &eh_bases, &mut ranges, &mut stats)?;
    }
    if let Some(s) = file.section_by_name(".debug_frame") {
        let section = DebugFrame::new(s.data()?, LittleEndian);
        let mut extra = Vec::new();
        // .debug_frame is only a complement: a broken one must not lose the .eh_frame table.
        if collect(&section, &bases, &mut extra, &mut stats).is_ok() {
            let covered = fde_starts(&ranges);
            extra.retain(|(start, _, _)| !covered.contains(start));
            ranges.extend(extra);
        }
    }
    let rows = pack(ranges)?;
    stats.build_time = started.elapsed();
    Ok(Table { rows, stats })
}

fn fde_starts(ranges: &[(u64, u64, Rule)]) -> std::collections::HashSet<u64> {
    ranges.iter().map(|r| r.0).collect()
}

/// Appends every row of every FDE of `section` as (start, end, rule).
fn collect<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    out: &mut Vec<(u64, u64, Rule)>,
    stats: &mut TableStats,
) -> Result<(), gimli::Error>
where
    S: UnwindSection<gimli::EndianSlice<'a, LittleEndian>>,
{
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
            continue;
        };
        if fde.len() == 0 {
            continue;
        }
        stats.fdes += 1;
        let mut table = fde.rows(section, bases, &mut ctx)?;
        while let Some(row) = table.next_row()? {
            let rule = convert(row, section);
            if rule.cfa_rule == cfa_rule::UNSUPPORTED {
                stats.unsupported += 1;
            }
            out.push((row.start_address(), row.end_address(), rule));
        }
    }
    Ok(())
}

/// The kernel half's view of one CFI row.
fn convert<'a, S>(row: &UnwindTableRow<usize>, section: &S) -> Rule
where
    S: UnwindSection<gimli::EndianSlice<'a, LittleEndian>>,
{
    let unsupported = Rule {
        cfa_rule: cfa_rule::UNSUPPORTED,
        ..NO_RULE
    };
    match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => {
            return Rule {
                cfa_rule: cfa_rule::END,
                ..NO_RULE
            }
        }
        _ => return unsupported,
    }
    let (cfa, cfa_offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(offset) = i32::try_from(*offset) else {
                return unsupported;
            };
            match *register {
                X86_64::RSP => (cfa_rule::RSP, offset),
                X86_64::RBP => (cfa_rule::RBP, offset),
                _ => return unsupported,
            }
        }
        CfaRule::Expression(e) => match e.get(section).map(|e| expression(e.0.slice())) {
            Ok(Some(r)) => r,
            _ => return unsupported,
        },
    };
    let (rbp, rbp_offset) = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) => (rbp_rule::SAME, 0),
        Some(RegisterRule::Offset(o)) => match i32::try_from(o) {
            Ok(o) => (rbp_rule::OFFSET, o),
            Err(_) => (rbp_rule::UNDEFINED, 0),
        },
        Some(_) => (rbp_rule::UNDEFINED, 0),
    };
    Rule {
        cfa_rule: cfa,
        cfa_offset,
        rbp_rule: rbp,
        rbp_offset,
        ..NO_RULE
    }
}

const DW_OP_BREG6: u8 = 0x76;
const DW_OP_DEREF: u8 = 0x06;

/// The two CFA expressions compilers and linkers write on x86-64: the PLT stub's, and the
/// one of a function that realigned its stack (`DW_OP_breg6 N; DW_OP_deref`).
fn expression(bytes: &[u8]) -> Option<(u8, i32)> {
    // DW_OP_breg7 (rsp) 8; DW_OP_breg16 (rip) 0; DW_OP_lit15; DW_OP_and; DW_OP_litN; DW_OP_ge;
    // DW_OP_lit3; DW_OP_shl; DW_OP_plus
    const PLT_HEAD: [u8; 6] = [0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a];
    const PLT_TAIL: [u8; 4] = [0x2a, 0x33, 0x24, 0x22];
    if bytes.len() == 11 && bytes[..6] == PLT_HEAD && bytes[7..] == PLT_TAIL {
        let lit = bytes[6].checked_sub(0x30)?; // DW_OP_lit0
        return (lit < 32).then_some((cfa_rule::PLT, i32::from(lit)));
    }
    if bytes.first() == Some(&DW_OP_BREG6) && bytes.last() == Some(&DW_OP_DEREF) {
        let mut r = gimli::EndianSlice::new(&bytes[1..bytes.len() - 1], LittleEndian);
        let offset = gimli::Reader::read_sleb128(&mut r).ok()?;
        if gimli::Reader::is_empty(&r) {
            return Some((cfa_rule::DEREF_RBP, i32::try_from(offset).ok()?));
        }
    }
    None
}

/// Sorts the ranges into rows, marking the gaps between functions with [`cfa_rule::NONE`] and
/// merging neighbours with the same rule.
fn pack(mut ranges: Vec<(u64, u64, Rule)>) -> Result<Vec<CompiledRow>, CompileError> {
    ranges.sort_by_key(|r| r.0);
    let mut rows: Vec<CompiledRow> = Vec::with_capacity(ranges.len() + ranges.len() / 4);
    let mut last: Option<Rule> = None;
    let mut end = 0u64;
    let push = |rows: &mut Vec<CompiledRow>, pc: u64, rule: Rule| -> Result<(), CompileError> {
        let pc = u32::try_from(pc).map_err(|_| CompileError::TooHigh(pc))?;
        if let Some(prev) = rows.last_mut() {
            if prev.pc == pc {
                // An empty range (or an overlap): the later rule wins.
                *prev = CompiledRow { pc, rule };
                return Ok(());
            }
        }
        rows.push(CompiledRow { pc, rule });
        Ok(())
    };
    for (start, stop, rule) in ranges {
        if start >= stop {
            continue;
        }
        if last.is_some() && start > end {
            push(&mut rows, end, NO_RULE)?;
            last = Some(NO_RULE);
        }
        if last != Some(rule) {
            push(&mut rows, start, rule)?;
            last = Some(rule);
        }
        end = end.max(stop);
    }
    if last.is_some() {
        push(&mut rows, end, NO_RULE)?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_at(rows: &[CompiledRow], pc: u32) -> Option<UnwindRule> {
        let i = rows.partition_point(|r| r.pc <= pc);
        (i > 0).then(|| rows[i - 1].rule)
    }

    #[test]
    fn libc_malloc_entry_is_rsp_plus_8() {
        let path = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let data = std::fs::read(path).unwrap();
        let table = compile(&data).unwrap();
        assert!(table.stats.fdes > 1000, "{:?}", table.stats);
        assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc));
        let file = object::File::parse(&*data).unwrap();
        let malloc = object::Object::dynamic_symbols(&file)
            .find(|s| object::ObjectSymbol::name(s) == Ok("malloc"))
            .unwrap();
        let at = object::ObjectSymbol::address(&malloc) as u32;
        let r = rule_at(&table.rows, at).unwrap();
        assert_eq!((r.cfa_rule, r.cfa_offset), (cfa_rule::RSP, 8), "{r:?}");
    }

    #[test]
    fn page_index_bounds_every_lookup() {
        let data = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        let table = compile(&data).unwrap();
        let (first, index) = table.page_index();
        // Every address's row is within its page's range, as the kernel half searches it.
        for pc in (table.rows[0].pc..table.rows.last().unwrap().pc).step_by(97) {
            let want = table.rows.partition_point(|r| r.pc <= pc) - 1;
            let p = ((pc >> UNWIND_PAGE_SHIFT) - first) as usize;
            let (lo, hi) = (index[p].first as usize, index[p].last as usize);
            assert!(
                lo <= want && want <= hi,
                "pc {pc:#x}: row {want} not in {lo}..={hi}"
            );
        }
    }

    #[test]
    fn plt_and_realign_expressions() {
        let plt = [
            0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22,
        ];
        assert_eq!(expression(&plt), Some((cfa_rule::PLT, 11)));
        // DW_OP_breg6 -8; DW_OP_deref
        assert_eq!(
            expression(&[0x76, 0x78, 0x06]),
            Some((cfa_rule::DEREF_RBP, -8))
        );
        assert_eq!(expression(&[0x76, 0x78, 0x06, 0x06]), None);
        assert_eq!(expression(&[]), None);
    }

    #[test]
    fn gaps_are_marked_and_neighbours_merged() {
        let a = Rule {
            cfa_rule: cfa_rule::RSP,
            cfa_offset: 8,
            ..NO_RULE
        };
        let b = Rule {
            cfa_offset: 16,
            ..a
        };
        let rows = pack(vec![
            (0x100, 0x104, a),
            (0x104, 0x110, b),
            (0x120, 0x130, a),
        ])
        .unwrap();
        let pcs: Vec<(u32, u8, i32)> = rows
            .iter()
            .map(|r| (r.pc, r.rule.cfa_rule, r.rule.cfa_offset))
            .collect();
        assert_eq!(
            pcs,
            vec![
                (0x100, cfa_rule::RSP, 8),
                (0x104, cfa_rule::RSP, 16),
                (0x110, cfa_rule::NONE, 0),
                (0x120, cfa_rule::RSP, 8),
                (0x130, cfa_rule::NONE, 0),
            ]
        );
    }
}

#[cfg(test)]
mod system_objects {
    use super::*;

    /// Debian's glibc, libstdc++ and python3.11, as shipped: their PLT stubs compile to the
    /// PLT rule, and the kernel half can evaluate all but a handful of their rows.
    #[test]
    fn almost_every_rule_is_supported() {
        for path in [
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/usr/bin/python3.11",
        ] {
            let Ok(data) = std::fs::read(path) else {
                panic!("{path} missing (cargo xtask setup installs it)");
            };
            let t = compile(&data).unwrap();
            let count = |rule| t.rows.iter().filter(|r| r.rule.cfa_rule == rule).count();
            assert!(count(cfa_rule::PLT) >= 1, "{path}: no PLT row");
            assert!(count(cfa_rule::RSP) > 10_000, "{path}: {:?}", t.stats);
            assert!(
                count(cfa_rule::UNSUPPORTED) * 1000 < t.rows.len(),
                "{path}: {} unsupported rows of {}",
                count(cfa_rule::UNSUPPORTED),
                t.rows.len()
            );
        }
    }
}
