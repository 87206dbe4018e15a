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
use std::path::Path;

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

/// Where to put the probe, in bytes past the function's entry, for code `code` at address `ip`.
pub fn place(code: &[u8], ip: u64, reads: Reads) -> u64 {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let protected: Vec<Register> = ARG_REGISTERS[..reads.args.min(6)]
        .iter()
        .copied()
        .chain([Register::RSP, Register::RBP])
        .collect();
    for _ in 0..LOOKAHEAD {
        if !decoder.can_decode() {
            break;
        }
        let instr = decoder.decode();
        if instr.is_invalid() {
            break;
        }
        if emulated(&instr) {
            return instr.ip() - ip;
        }
        if instr.flow_control() != FlowControl::Next {
            break;
        }
        let info = factory.info(&instr);
        let writes_protected = info
            .used_registers()
            .iter()
            .any(|r| writes(r.access()) && protected.contains(&r.register().full_register()));
        let writes_memory = info.used_memory().iter().any(|m| writes(m.access()));
        if writes_protected || writes_memory {
            break;
        }
    }
    0
}

/// The placement of `symbol`'s entry probe in the ELF object at `path`, if its code can be read.
pub fn place_symbol(path: &Path, symbol: &str, reads: Reads) -> Option<u64> {
    let (code, addr) = code_of(path, symbol)?;
    Some(place(&code, addr, reads))
}

/// Whether a probe at `symbol+offset` of the object at `path` is single-stepped by the kernel
/// (its instruction is not one the kernel emulates): a hit then costs two traps.
pub fn single_stepped(path: &Path, symbol: &str, offset: u64) -> bool {
    code_of(path, symbol).is_some_and(|(code, _)| steps(&code, offset))
}

/// Whether the instruction `offset` bytes into `code` is single-stepped.
fn steps(code: &[u8], offset: u64) -> bool {
    let Some(at) = usize::try_from(offset).ok().and_then(|o| code.get(o..)) else {
        return false;
    };
    let mut decoder = Decoder::with_ip(64, at, 0, DecoderOptions::NONE);
    let instr = decoder.decode();
    !instr.is_invalid() && !emulated(&instr)
}

/// The first 64 bytes of `symbol`'s code in the ELF object at `path`, and its address.
fn code_of(path: &Path, symbol: &str) -> Option<(Vec<u8>, u64)> {
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
    Some((code.to_vec(), addr))
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
        assert_eq!(place_symbol(libc, "free", ONE), Some(3));
        assert_eq!(place_symbol(libc, "malloc", ONE), Some(0));
    }
}
