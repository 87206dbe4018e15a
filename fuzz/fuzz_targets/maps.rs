//! /proc/PID/maps text: any text gives mappings (bad lines skipped), never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    for m in bridge_trace::model::maps::parse_maps(text) {
        assert!(m.start <= m.end, "{text:?}: {m:?}");
    }
});
