//! `--duration`, `--interval`, `--min-age`, ...: any text gives a duration or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = bridge_trace::units::parse_duration("--duration", text);
});
