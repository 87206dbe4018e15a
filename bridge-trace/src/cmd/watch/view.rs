//! `top`: the sites of one window as a table, redrawn in place on a terminal (plain frames one
//! after the other otherwise, for a pipe or a log).
use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    time::Duration,
};

use super::metrics::{Sample, TracerSample};
use crate::units::human_bytes;

/// The table of one window.
pub fn render(
    tracer: &TracerSample,
    sample: &Sample,
    name: &str,
    elapsed: Duration,
    rows: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bridge-trace top: {name} (pid {}), {:.0}s, window {}  RSS {}  outstanding {}  \
         allocs {}  frees {}  tier {}  overhead {:.2}% of a CPU",
        sample.pid,
        elapsed.as_secs_f64(),
        sample.windows,
        human_bytes(sample.rss_bytes),
        sample
            .outstanding_bytes
            .map_or_else(|| "(growth tier)".into(), human_bytes),
        tracer.allocs,
        tracer.frees,
        tracer.tier,
        tracer.overhead * 100.0
    );
    let _ = writeln!(
        out,
        "{:<10} {:>12} {:>12} {:>10} {:>12}  SITE",
        "CLASS", "HELD", "OLD", "COUNT", "GROWTH/s"
    );
    for s in sample.sites.iter().filter(|s| s.bytes > 0).take(rows) {
        let growth = if s.growth_bytes_per_second >= 0.0 {
            format!("+{}", human_bytes(s.growth_bytes_per_second as u64))
        } else {
            format!("-{}", human_bytes((-s.growth_bytes_per_second) as u64))
        };
        let _ = writeln!(
            out,
            "{:<10} {:>12} {:>12} {:>10} {:>12}  {}",
            s.class.name(),
            human_bytes(s.bytes),
            human_bytes(s.old_bytes),
            s.count,
            growth,
            s.label
        );
    }
    out
}

/// Prints the table: in place on a terminal, as a new frame otherwise.
pub fn show(tracer: &TracerSample, sample: &Sample, name: &str, elapsed: Duration, rows: usize) {
    let text = render(tracer, sample, name, elapsed, rows);
    let mut stdout = std::io::stdout().lock();
    let _ = if stdout.is_terminal() {
        write!(stdout, "\x1b[H\x1b[2J{text}")
    } else {
        writeln!(stdout, "{text}")
    };
    let _ = stdout.flush();
}
