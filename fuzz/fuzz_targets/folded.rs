//! Folded stacks for `bridge-trace diff`: any text gives stacks or an error naming a line, and
//! stacks always give a table and differential lines.
#![no_main]
use bridge_trace::cmd::diff;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(stacks) = diff::parse_folded(text) {
        let sites = diff::sites(&stacks, &stacks);
        assert!(sites.iter().all(|s| s.growth() == 0));
        let _ = diff::table(&sites, 10);
        let _ = diff::differential_lines(&diff::Stacks::new(), &stacks);
    }
});
