//! Probe placement decodes the machine code of whatever allocator a target maps: any bytes give
//! an offset inside them (0: the entry), never a panic.
#![no_main]
use bridge_trace::attach::placement::{place, Reads};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, &[u8])| {
    let (args, code) = input;
    let offset = place(code, 0x1000, Reads { args: usize::from(args % 7) });
    assert!(offset == 0 || (offset as usize) < code.len(), "offset {offset} of {}", code.len());
});
