//! The top stacks as plain text, leaf first, for a terminal or a ticket.
use std::io::Write as _;

use super::Render;
use crate::aggregate::Report;
use crate::units::human_bytes;

pub struct Text {
    pub top: usize,
}

impl Render for Text {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()> {
        let m = &report.meta;
        writeln!(
            out,
            "bridge-trace: {} (pid {}), traced {:.1}s{}",
            m.target,
            m.pid,
            m.duration_secs,
            if m.target_exited {
                ", until it exited"
            } else {
                ""
            }
        )?;
        // The growth tier sees first touches of new memory, not allocations.
        let growth = m.tier.as_deref() == Some("growth");
        if growth {
            writeln!(
                out,
                "new memory first touched: {} bytes ({}) from {} call stacks (growth tier: \
                 page faults, not allocations; the code that first touches memory is not \
                 always the code that holds it)",
                report.total_bytes(),
                human_bytes(report.total_bytes()),
                report.stacks.len()
            )?;
        } else {
            writeln!(
                out,
                "outstanding: {} bytes ({}) in {} allocations from {} call stacks",
                report.total_bytes(),
                human_bytes(report.total_bytes()),
                report.total_count(),
                report.stacks.len()
            )?;
        }
        let place: Vec<String> = [
            m.host.as_ref().map(|h| format!("host {h}")),
            m.kernel.as_ref().map(|k| format!("kernel {k}")),
            m.started.as_ref().map(|s| format!("started {s}")),
            m.tier.as_ref().map(|t| format!("tier {t}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !place.is_empty() {
            writeln!(out, "{}", place.join(", "))?;
        }
        if let Some(age) = m.min_age_secs {
            writeln!(
                out,
                "only allocations older than {age}s ({} younger ones left out)",
                m.younger_than_min_age
            )?;
        }
        let c = &m.counters;
        writeln!(
            out,
            "events: {} allocations, {} frees, {} failed; lost: {} dropped (map full), {} stacks \
             not stored, {} frees of unknown addresses{}",
            c.allocs,
            c.frees,
            c.failed_allocs,
            c.map_full_drops,
            c.stack_failures,
            c.unknown_frees,
            if c.internal_frees > 0 {
                format!(
                    " ({} more by the allocator itself, of its own cached blocks)",
                    c.internal_frees
                )
            } else {
                String::new()
            }
        )?;
        if let Some(u) = &m.unwind {
            writeln!(out, "stacks: {}", u.describe())?;
        }
        for caveat in report.caveats() {
            writeln!(out, "note: {caveat}")?;
        }
        for (i, s) in report.stacks.iter().take(self.top).enumerate() {
            writeln!(out)?;
            let partial = if s.partial {
                " (direct caller only)"
            } else {
                ""
            };
            if growth {
                writeln!(
                    out,
                    "#{} {} bytes ({}) of new memory first touched{partial}",
                    i + 1,
                    s.bytes,
                    human_bytes(s.bytes),
                )?;
            } else {
                let class = s
                    .class
                    .as_deref()
                    .map(|c| format!(", {c}"))
                    .unwrap_or_default()
                    + &s.runtime
                        .as_deref()
                        .map(|r| format!(" [runtime: {r}]"))
                        .unwrap_or_default();
                writeln!(
                    out,
                    "#{} {} bytes ({}) in {} allocations, oldest {:.1}s{class}{partial}",
                    i + 1,
                    s.bytes,
                    human_bytes(s.bytes),
                    s.count,
                    s.oldest_age_secs,
                )?;
            }
            if !s.wrappers.is_empty() {
                let through: Vec<&str> =
                    s.wrappers.iter().rev().map(|f| f.display_name()).collect();
                writeln!(out, "    (allocated through {})", through.join(" <- "))?;
            }
            for f in s.frames.iter().rev() {
                let location = match (&f.file, f.line) {
                    (Some(file), Some(line)) => format!(" at {file}:{line}"),
                    (Some(file), None) => format!(" at {file}"),
                    _ => match (&f.module, f.offset) {
                        (Some(module), Some(off)) => format!(" in {module}+{off:#x}"),
                        _ => String::new(),
                    },
                };
                let inlined = if f.inlined { " (inlined)" } else { "" };
                writeln!(out, "    {}{inlined}{location}", f.display_name())?;
            }
            if s.truncated {
                writeln!(out, "    ... (deeper frames not recorded)")?;
            }
        }
        if report.stacks.len() > self.top {
            writeln!(out)?;
            writeln!(
                out,
                "... and {} more stacks",
                report.stacks.len() - self.top
            )?;
        }
        if let Some(allocated) = report.allocated.as_ref().filter(|a| !a.is_empty()) {
            hottest(out, allocated, self.top)?;
        }
        over_time(out, report, self.top)?;
        Ok(())
    }
}

/// The timeline in a few lines: where the total and the resident set went, and the peak with
/// the sites that held it.
fn over_time(out: &mut Vec<u8>, report: &Report, top: usize) -> std::io::Result<()> {
    writeln!(out)?;
    let Some(t) = &report.timeline else {
        return writeln!(
            out,
            "over time: no timeline in this capture (written before capture format version 4)"
        );
    };
    let (Some(first), Some(last)) = (t.points.first(), t.points.last()) else {
        return writeln!(out, "over time: no tick was taken");
    };
    let rss = match (first.rss_bytes, last.rss_bytes) {
        (Some(a), Some(b)) => format!("; resident set {} -> {}", human_bytes(a), human_bytes(b)),
        _ => String::new(),
    };
    writeln!(
        out,
        "over time ({} points, every {:.2}s): held {} at {:.1}s -> {} at {:.1}s{rss}",
        t.points.len(),
        t.every_secs,
        human_bytes(first.bytes as u64),
        first.at_secs,
        human_bytes(last.bytes as u64),
        last.at_secs,
    )?;
    for e in &t.events {
        writeln!(out, "    {:>7.1}s  {}", e.at_secs, e.what)?;
    }
    if let Some(p) = &t.peak {
        writeln!(
            out,
            "peak: {} bytes ({}) in {} allocations at {:.1}s (totals read every {:.2}s); held \
             then by:",
            p.bytes,
            human_bytes(p.bytes),
            p.count,
            p.at_secs,
            t.peak_every_secs
        )?;
        for s in p.stacks.iter().take(top) {
            let (name, at) = super::site(s);
            let at = if at.is_empty() {
                String::new()
            } else {
                format!(" at {at}")
            };
            writeln!(
                out,
                "    {:>12} ({}) in {} allocations: {name}{at}",
                s.bytes,
                human_bytes(s.bytes),
                s.count
            )?;
        }
    }
    Ok(())
}

/// The stacks that allocated the most while traced, freed or not, one line each.
fn hottest(
    out: &mut Vec<u8>,
    allocated: &[crate::aggregate::StackReport],
    top: usize,
) -> std::io::Result<()> {
    let bytes: u64 = allocated.iter().map(|s| s.bytes).sum();
    let count: u64 = allocated.iter().map(|s| s.count).sum();
    writeln!(out)?;
    writeln!(
        out,
        "allocated while traced (freed or not): {bytes} bytes ({}) in {count} allocations; \
         the call sites that allocated most:",
        human_bytes(bytes)
    )?;
    for s in super::hottest_sites(allocated, top) {
        let at = if s.at.is_empty() {
            String::new()
        } else {
            format!(" at {}", s.at)
        };
        let lifetimes = s
            .lifetimes
            .as_deref()
            .and_then(super::describe_lifetimes)
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        writeln!(
            out,
            "    {:>12} ({}) in {} allocations: {}{at}{lifetimes}",
            s.bytes,
            human_bytes(s.bytes),
            s.count,
            s.name
        )?;
    }
    Ok(())
}
