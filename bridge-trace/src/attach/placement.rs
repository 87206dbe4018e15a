//! Where each entry probe goes. A uprobe on an instruction the kernel cannot emulate is
//! single-stepped out of line, two traps instead of one: about 14 µs a hit on this kind of
//! machine against about 0.5 µs for an emulated one (a `push` of a register, a `nop`, a relative
//! jump, call or conditional jump). glibc's `free` begins `test %rdi,%rdi; je …`: its `je`,
//! three bytes in, is emulated.
//!
//! [`place`] decodes the function's first instructions (iced-x86) and keeps the entry when the
//! kernel emulates its instruction; otherwise it moves the probe to the first emulated
//! instruction within reach, provided that the instructions before it run straight through
//! (no branch: every call reaches the probe) and write no register the program reads (its
//! arguments, `%rsp`, `%rbp`) and no memory. Anything else keeps the entry.
//!
//! With multi-uprobe links, which carry a cookie per place, [`place_following`] also goes past
//! an argument's register being reused once the function has copied the argument to another
//! one (mimalloc's `malloc` begins `mov %rdi,%rsi; mov %fs:(%rax),%rdi`): the program then
//! reads the copy ([`Placed::cookie`]).
use std::path::Path;

use bridge_trace_common::{pt_regs_slot, ARG_COOKIE_BITS};

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

/// What an entry program reads of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reads {
    /// Integer arguments read, in the System V order (rdi, rsi, rdx, rcx, r8, r9).
    pub args: usize,
}

/// Instructions looked at past the entry: enough for jemalloc's `free`, whose first branch (an
/// emulated `jne`) is its tenth instruction, after register arithmetic only.
const LOOKAHEAD: usize = 12;
const ARG_REGISTERS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// A probe's place: bytes past the function's entry, and the register holding each argument
/// the program reads there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub offset: u64,
    pub holders: Vec<Register>,
}

impl Placed {
    /// The entry program's attach cookie ([`ARG_COOKIE_BITS`]): 0 when every argument is in
    /// its ABI register.
    pub fn cookie(&self) -> u64 {
        self.holders
            .iter()
            .zip(ARG_REGISTERS)
            .enumerate()
            .map(|(i, (&held, abi))| {
                let slot = if held == abi { 0 } else { slot_of(held) + 1 };
                slot << (ARG_COOKIE_BITS as usize * i)
            })
            .sum()
    }
}

/// Where to put the probe, in bytes past the function's entry, for code `code` at address `ip`,
/// every argument the program reads still in its ABI register.
pub fn place(code: &[u8], ip: u64, reads: Reads) -> u64 {
    place_following(code, ip, reads, false).offset
}

/// Where to put the probe; with `follow`, past a reuse of an argument's register once the
/// argument is copied to another (the probe then carries where: [`Placed::cookie`]).
pub fn place_following(code: &[u8], ip: u64, reads: Reads, follow: bool) -> Placed {
    let args = reads.args.min(6);
    let entry = Placed {
        offset: 0,
        holders: ARG_REGISTERS[..args].to_vec(),
    };
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    // The registers holding each argument so far.
    let mut holders: Vec<Vec<Register>> = ARG_REGISTERS[..args].iter().map(|&r| vec![r]).collect();
    for _ in 0..LOOKAHEAD {
        if !decoder.can_decode() {
            break;
        }
        let instr = decoder.decode();
        if instr.is_invalid() {
            break;
        }
        if emulated(&instr) {
            let holders = holders
                .iter()
                .zip(ARG_REGISTERS)
                .map(|(h, abi)| if h.contains(&abi) { abi } else { h[0] })
                .collect();
            return Placed {
                offset: instr.ip() - ip,
                holders,
            };
        }
        if instr.flow_control() != FlowControl::Next {
            break;
        }
        let info = factory.info(&instr);
        if info.used_memory().iter().any(|m| writes(m.access())) {
            break;
        }
        // A whole 64-bit register copied to another.
        let copy = (instr.mnemonic() == Mnemonic::Mov
            && instr.op_count() == 2
            && instr.op0_kind() == OpKind::Register
            && instr.op1_kind() == OpKind::Register
            && instr.op0_register().is_gpr64()
            && instr.op1_register().is_gpr64())
        .then(|| (instr.op0_register(), instr.op1_register()));
        let written: Vec<Register> = info
            .used_registers()
            .iter()
            .filter(|r| writes(r.access()))
            .map(|r| r.register().full_register())
            .collect();
        if written
            .iter()
            .any(|r| matches!(*r, Register::RSP | Register::RBP))
        {
            break;
        }
        for r in written {
            for h in holders.iter_mut() {
                // `r` now holds a copy of this argument.
                let copied = matches!(copy, Some((dst, src)) if dst == r && h.contains(&src));
                if copied {
                    if follow && !h.contains(&r) {
                        h.push(r);
                    }
                } else if follow {
                    h.retain(|&held| held != r);
                } else if h.contains(&r) {
                    // Not following: any write of an argument's own register stops here.
                    h.clear();
                }
            }
        }
        if holders.iter().any(Vec::is_empty) {
            break;
        }
    }
    entry
}

/// `register`'s slot in `struct pt_regs`.
fn slot_of(register: Register) -> u64 {
    match register {
        Register::R15 => pt_regs_slot::R15,
        Register::R14 => pt_regs_slot::R14,
        Register::R13 => pt_regs_slot::R13,
        Register::R12 => pt_regs_slot::R12,
        Register::RBP => pt_regs_slot::RBP,
        Register::RBX => pt_regs_slot::RBX,
        Register::R11 => pt_regs_slot::R11,
        Register::R10 => pt_regs_slot::R10,
        Register::R9 => pt_regs_slot::R9,
        Register::R8 => pt_regs_slot::R8,
        Register::RAX => pt_regs_slot::RAX,
        Register::RCX => pt_regs_slot::RCX,
        Register::RDX => pt_regs_slot::RDX,
        Register::RSI => pt_regs_slot::RSI,
        _ => pt_regs_slot::RDI,
    }
}

/// Where a probe on `symbol` of an ELF object goes, read from the object once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The offset in the file of the symbol's first instruction.
    pub file_offset: u64,
    /// Where an entry program that reads `reads` goes ([`place_following`]); none asked:
    /// the first instruction.
    pub placed: Option<Placed>,
    /// Whether the kernel single-steps the instruction there (a hit then costs two traps).
    pub stepped: bool,
}

/// Locates `symbol`'s probe in the ELF object at `path`: placed for `reads` when given, else
/// on its first instruction. `None` when the object has no such symbol with code.
pub fn locate_symbol(
    path: &Path,
    symbol: &str,
    reads: Option<Reads>,
    follow: bool,
) -> Option<Located> {
    let (code, addr, file_offset) = code_of(path, symbol)?;
    let placed = reads.map(|reads| place_following(&code, addr, reads, follow));
    let stepped = steps(&code, placed.as_ref().map_or(0, |p| p.offset));
    Some(Located {
        file_offset,
        placed,
        stepped,
    })
}

/// Whether the instruction `offset` bytes into `code` is single-stepped.
pub fn steps(code: &[u8], offset: u64) -> bool {
    let Some(at) = usize::try_from(offset).ok().and_then(|o| code.get(o..)) else {
        return false;
    };
    let mut decoder = Decoder::with_ip(64, at, 0, DecoderOptions::NONE);
    let instr = decoder.decode();
    !instr.is_invalid() && !emulated(&instr)
}

/// The first 64 bytes of `symbol`'s code in the ELF object at `path`, its address and its
/// offset in the file.
fn code_of(path: &Path, symbol: &str) -> Option<(Vec<u8>, u64, u64)> {
    use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: a read-only mapping of a binary, read once, right now.
    let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let elf = object::File::parse(&*data).ok()?;
    let sym = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .find(|s| s.name() == Ok(symbol) && s.address() != 0)?;
    let addr = sym.address();
    let offset = elf.segments().find_map(|s| {
        let (off, size) = s.file_range();
        let start = s.address();
        (addr >= start && addr < start + size).then(|| off + (addr - start))
    })?;
    let start = usize::try_from(offset).ok()?;
    let code = data.get(start..(start + 64).min(data.len()))?;
    Some((code.to_vec(), addr, offset))
}

fn writes(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// Whether the kernel's uprobes emulate `i` (arch/x86/kernel/uprobes.c: relative jumps, calls
/// and conditional jumps, `push` of a general register, `nop`) rather than single-step it.
fn emulated(i: &Instruction) -> bool {
    match i.mnemonic() {
        Mnemonic::Push => {
            i.op_count() == 1 && i.op0_kind() == OpKind::Register && i.op0_register().is_gpr64()
        }
        Mnemonic::Nop => true,
        Mnemonic::Jmp | Mnemonic::Call => {
            matches!(i.op0_kind(), OpKind::NearBranch64)
        }
        _ => i.flow_control() == FlowControl::ConditionalBranch && i.is_jcc_short_or_near(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: Reads = Reads { args: 1 };

    #[test]
    fn single_stepped_instructions_are_told_apart() {
        // test %rdi,%rdi (stepped); je +0xbf (emulated); push %rbp (emulated).
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55];
        assert!(steps(&code, 0));
        assert!(!steps(&code, 3));
        assert!(!steps(&code, 9));
    }

    #[test]
    fn jemalloc_free_moves_to_its_first_branch() {
        // Debian's libjemalloc.so.2 free: mov %rdi,%rax; mov 0xa530e(%rip),%rdx; mov %rdi,%rcx;
        // shr $0x1a,%rax; and $-0x40000000,%rcx; and $0xf0,%eax; add %fs:0,%rax;
        // add %rdx,%rax; cmp 0x1b0(%rax),%rcx; jne +0x8a: only scratch registers written.
        let code = [
            0x48, 0x89, 0xf8, 0x48, 0x8b, 0x15, 0x0e, 0x53, 0x0a, 0x00, 0x48, 0x89, 0xf9, 0x48,
            0xc1, 0xe8, 0x1a, 0x48, 0x81, 0xe1, 0x00, 0x00, 0x00, 0xc0, 0x25, 0xf0, 0x00, 0x00,
            0x00, 0x64, 0x48, 0x03, 0x04, 0x25, 0x00, 0x00, 0x00, 0x00, 0x48, 0x01, 0xd0, 0x48,
            0x3b, 0x88, 0xb0, 0x01, 0x00, 0x00, 0x0f, 0x85, 0x8a, 0x00, 0x00, 0x00,
        ];
        assert_eq!(place(&code, 0x27c60, ONE), 48);
    }

    #[test]
    fn glibc_free_moves_to_its_null_check_branch() {
        // test %rdi,%rdi; je +0xbf; push %rbp: the je is emulated, every call passes it.
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55];
        assert_eq!(place(&code, 0x98ef0, ONE), 3);
        // glibc's posix_memalign: cmpb $0,hook(%rip); push %r12.
        let code = [0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00, 0x41, 0x54];
        assert_eq!(place(&code, 0x9a280, Reads { args: 3 }), 7);
    }

    #[test]
    fn an_emulated_entry_stays() {
        // push %r12; push %rbp (glibc's malloc)
        assert_eq!(place(&[0x41, 0x54, 0x55], 0x1000, ONE), 0);
        // nop; mov …
        assert_eq!(place(&[0x90, 0x48, 0x89, 0xfb], 0x1000, ONE), 0);
        // jmp rel8
        assert_eq!(place(&[0xeb, 0x10], 0x1000, ONE), 0);
    }

    #[test]
    fn never_past_a_write_of_what_the_program_reads() {
        // mov %rax,%rdi; push %rbp: the argument changes before the push.
        assert_eq!(place(&[0x48, 0x89, 0xc7, 0x55], 0x1000, ONE), 0);
        // ... but a third argument may change when the program reads only the first.
        assert_eq!(place(&[0x48, 0x89, 0xc2, 0x55], 0x1000, ONE), 3);
        assert_eq!(
            place(&[0x48, 0x89, 0xc2, 0x55], 0x1000, Reads { args: 3 }),
            0
        );
        // sub $0x18,%rsp; push %rbp: the stack pointer moves.
        assert_eq!(place(&[0x48, 0x83, 0xec, 0x18, 0x55], 0x1000, ONE), 0);
        // mov %rdi,(%rax); push %rbp: a memory write.
        assert_eq!(place(&[0x48, 0x89, 0x38, 0x55], 0x1000, ONE), 0);
        // mov %rdi,%rbx; push %rbp: reads the argument, writes another register: fine.
        assert_eq!(place(&[0x48, 0x89, 0xfb, 0x55], 0x1000, ONE), 3);
    }

    #[test]
    fn never_past_a_branch_it_cannot_follow() {
        // jmp *%rax; push %rbp
        assert_eq!(place(&[0xff, 0xe0, 0x55], 0x1000, ONE), 0);
        // ret
        assert_eq!(place(&[0xc3, 0x55], 0x1000, ONE), 0);
        // Nothing emulated within reach.
        assert_eq!(place(&[0x48, 0x89, 0xfb], 0x1000, ONE), 0);
    }

    #[test]
    fn this_machines_libc() {
        let libc = Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6");
        if !libc.exists() {
            return;
        }
        // Debian 12's glibc 2.36: free's null check branch 3 bytes in; malloc starts with a push.
        let located = |symbol| locate_symbol(libc, symbol, Some(ONE), true).unwrap();
        let offset = |symbol| located(symbol).placed.map(|p| p.offset);
        assert_eq!(offset("free"), Some(3));
        assert_eq!(offset("malloc"), Some(0));
        assert!(!located("free").stepped && !located("malloc").stepped);
        // Its entry, where no placement was asked for, is single-stepped.
        let entry = locate_symbol(libc, "free", None, true).unwrap();
        assert!(entry.placed.is_none() && entry.stepped);
    }

    #[test]
    fn an_argument_copied_before_its_register_is_reused_is_read_from_the_copy() {
        // Debian's libmimalloc.so.2.0 malloc: mov 0xb449(%rip),%rax; mov %rdi,%rsi;
        // mov %fs:(%rax),%rdi; cmp $0x400,%rsi; ja +0x29.
        let code = [
            0x48, 0x8b, 0x05, 0x49, 0xb4, 0x00, 0x00, 0x48, 0x89, 0xfe, 0x64, 0x48, 0x8b, 0x38,
            0x48, 0x81, 0xfe, 0x00, 0x04, 0x00, 0x00, 0x77, 0x29,
        ];
        // Without a cookie to say where the size went, the entry (single-stepped) it is.
        assert_eq!(place(&code, 0x10b70, ONE), 0);
        let placed = place_following(&code, 0x10b70, ONE, true);
        assert_eq!(placed.offset, 21);
        assert_eq!(placed.holders, [Register::RSI]);
        assert_eq!(placed.cookie(), pt_regs_slot::RSI + 1);
        // Its realloc: mov …(%rip),%rax; mov %rsi,%rdx; mov %rdi,%rsi; mov %fs:(%rax),%rax;
        // mov %rax,%rdi; jmp mi_heap_realloc: the pointer is in %rsi, the size in %rdx.
        let code = [
            0x48, 0x8b, 0x05, 0x49, 0xa9, 0x00, 0x00, 0x48, 0x89, 0xf2, 0x48, 0x89, 0xfe, 0x64,
            0x48, 0x8b, 0x00, 0x48, 0x89, 0xc7, 0xe9, 0xf7, 0x4e, 0xff, 0xff,
        ];
        let placed = place_following(&code, 0x11670, Reads { args: 2 }, true);
        assert_eq!(placed.offset, 20);
        assert_eq!(placed.holders, [Register::RSI, Register::RDX]);
        assert_eq!(
            placed.cookie(),
            (pt_regs_slot::RSI + 1) | (pt_regs_slot::RDX + 1) << ARG_COOKIE_BITS
        );
    }

    #[test]
    fn an_argument_whose_every_copy_is_overwritten_stops_the_search() {
        // mov %rdi,%rsi; mov %rax,%rsi; mov %rax,%rdi; push %rbp: the size is gone.
        let code = [0x48, 0x89, 0xfe, 0x48, 0x89, 0xc6, 0x48, 0x89, 0xc7, 0x55];
        assert_eq!(place_following(&code, 0x1000, ONE, true).offset, 0);
        // A 32-bit copy is not the whole argument: mov %edi,%esi; mov %rax,%rdi; push %rbp.
        let code = [0x89, 0xfe, 0x48, 0x89, 0xc7, 0x55];
        assert_eq!(place_following(&code, 0x1000, ONE, true).offset, 0);
        // Nothing copied, nothing moved: the cookie stays 0 (mov %rdi,%rbx; push %rbp).
        let placed = place_following(&[0x48, 0x89, 0xfb, 0x55], 0x1000, ONE, true);
        assert_eq!((placed.offset, placed.cookie()), (3, 0));
    }
}
