//! Probe placement decodes the machine code of whatever allocator a target maps: any bytes give
//! an offset inside them (0: the entry) and a holder for every argument read, never a panic.
#![no_main]
use bridge_trace::attach::placement::{place, place_following, Reads};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, &[u8])| {
    let (args, code) = input;
    let reads = Reads { args: usize::from(args % 7) };
    let offset = place(code, 0x1000, reads);
    assert!(offset == 0 || (offset as usize) < code.len(), "offset {offset} of {}", code.len());
    let placed = place_following(code, 0x1000, reads, true);
    assert!(placed.offset == 0 || (placed.offset as usize) < code.len());
    assert_eq!(placed.holders.len(), reads.args.min(6));
    // Following copies goes only where not following could not: the same first emulated
    // instruction whenever that one was reachable.
    assert!(offset == 0 || placed.offset == offset, "{offset} then {}", placed.offset);
    let _ = placed.cookie();
});
