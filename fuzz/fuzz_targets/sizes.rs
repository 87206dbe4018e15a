//! Sizes (`--sample-interval 512KiB`), rates (`--alert-growth 1MiB/min`), budgets
//! (`--max-overhead 1%`) and modes (`--mode 600`): any text gives a value or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = bridge_trace::units::parse_size("--sample-interval", text);
    let _ = bridge_trace::units::parse_rate("--alert-growth", text);
    if let Ok(Some(share)) = bridge_trace::units::parse_budget(text) {
        assert!(share.is_finite() && share > 0.0, "{text:?} gave {share}");
    }
    if let Ok(mode) = bridge_trace::units::parse_mode(text) {
        assert!(mode <= 0o777, "{text:?} gave {mode:o}");
    }
});
