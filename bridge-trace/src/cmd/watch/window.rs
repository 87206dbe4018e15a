//! One window of one watched process: its snapshot grouped by call site (each stack labelled
//! once, by its first frame outside the allocator), each site's window classified, and the
//! log lines and alerts that follow.
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use super::{metrics, rss_bytes, Proc, Sites, WatchConfig, FORGET_AFTER_WINDOWS, INSIDE_ALLOCATOR};
use crate::{
    model::{
        classify::{held_by_stack, Class, Held, LEAK_WINDOWS, OLD_AFTER_WINDOWS},
        snapshot::Snapshot,
    },
    symbolize::{symbolize_addrs, Frame},
    units::human_bytes,
};

/// A site that just started leaking, or grows past `--alert-growth`.
pub(super) struct Alert {
    pub(super) site: String,
    /// `leaking`, `growing` or `growth`.
    pub(super) reason: &'static str,
    /// The line logged.
    pub(super) line: String,
}

/// Closes one window of one process: its sites' windows, classes, log lines and alerts.
pub(super) fn process_window(
    pid: u32,
    p: &mut Proc,
    snap: &Snapshot,
    config: &WatchConfig,
    traced: bool,
    length: Duration,
) -> (metrics::Sample, Vec<Alert>) {
    p.windows += 1;
    let at_secs = p.started.elapsed().as_secs_f64();
    let mut alerts = Vec::new();
    let mut sites = Vec::new();
    if traced {
        // Old: past two windows of the length this one has (a step-up's are shorter).
        let old_ns = (length.as_secs_f64() * OLD_AFTER_WINDOWS * 1e9) as u64;
        let by_stack = held_by_stack(snap, old_ns, |a| stack_key(a.stack_id, a.ret_addr));
        label_new_stacks(p, snap, by_stack.keys(), false);
        let held = by_site(&p.allocs.labels, &by_stack);
        classify_sites(
            pid,
            &mut p.allocs,
            held,
            at_secs,
            config,
            false,
            &mut sites,
            &mut alerts,
        );
        for s in sites.iter().filter(|s| s.class == Class::Leaking) {
            p.named.insert(s.label.clone(), s.clone());
        }
    }
    // Growth sites keep the watch's own windows (a step-up's shorter ones would cut their
    // history into slices too thin to see growth in).
    let interval = config.interval.as_secs_f64();
    if !traced || p.growth_at.is_none_or(|t| at_secs - t >= 0.9 * interval) {
        p.growth_at = Some(at_secs);
        process_growth(
            pid,
            p,
            snap,
            at_secs,
            config,
            traced,
            &mut sites,
            &mut alerts,
        );
    }
    let sample = summarize(pid, p, snap, sites, traced);
    (sample, alerts)
}

/// Pushes one window of each growth site; in the growth tier (`traced` false) they are the
/// window's sites and alerts.
#[allow(clippy::too_many_arguments)]
fn process_growth(
    pid: u32,
    p: &mut Proc,
    snap: &Snapshot,
    at_secs: f64,
    config: &WatchConfig,
    traced: bool,
    sites: &mut Vec<metrics::SiteSample>,
    alerts: &mut Vec<Alert>,
) {
    let mut by_stack: HashMap<(u64, u64), Held> = HashMap::new();
    for g in &snap.growth {
        let h = by_stack
            .entry(stack_key(g.stack_id, g.ret_addr))
            .or_default();
        h.bytes += g.faulted as f64;
        h.count += g.events as f64;
    }
    label_new_stacks(p, snap, by_stack.keys(), true);
    let held = by_site(&p.growth.labels, &by_stack);
    // Growth sites are followed in every tier (their history must not break) but shown only
    // in the growth tier, where they are all there is.
    let mut growth_sites = Vec::new();
    let mut growth_alerts = Vec::new();
    classify_sites(
        pid,
        &mut p.growth,
        held,
        at_secs,
        config,
        true,
        &mut growth_sites,
        &mut growth_alerts,
    );
    if !traced {
        sites.extend(growth_sites);
        alerts.extend(growth_alerts);
        sites.extend(p.named.values().cloned());
    }
}

/// The window's sample of one process: its figures and its sites, worst first.
fn summarize(
    pid: u32,
    p: &Proc,
    snap: &Snapshot,
    mut sites: Vec<metrics::SiteSample>,
    traced: bool,
) -> metrics::Sample {
    // Leaking or growing first, then fastest growing, then largest: the exported top sites.
    sites.sort_by(|a, b| {
        let bad = |s: &metrics::SiteSample| matches!(s.class, Class::Leaking | Class::Growing);
        bad(b)
            .cmp(&bad(a))
            .then(
                b.growth_bytes_per_second
                    .total_cmp(&a.growth_bytes_per_second),
            )
            .then(b.bytes.cmp(&a.bytes))
            .then(a.label.cmp(&b.label))
    });
    metrics::Sample {
        pid,
        rss_bytes: rss_bytes(pid),
        outstanding_bytes: traced
            .then(|| snap.allocs.iter().map(|a| a.estimate().0).sum::<f64>() as u64),
        heap_growth_bytes: snap
            .growth
            .iter()
            .map(|g| g.mapped as i64 - g.unmapped as i64)
            .sum(),
        faulted_bytes: snap.growth.iter().map(|g| g.faulted).sum(),
        windows: p.windows,
        sites,
        labels: p.cgroup.as_ref().map(|c| c.labels()).unwrap_or_default(),
    }
}

pub(super) fn stack_key(stack_id: u64, ret_addr: u64) -> (u64, u64) {
    if stack_id != 0 {
        (stack_id, 0)
    } else {
        (0, ret_addr)
    }
}

/// Sums stacks into sites by their labels.
fn by_site(
    labels: &HashMap<(u64, u64), String>,
    by_stack: &HashMap<(u64, u64), Held>,
) -> HashMap<String, Held> {
    let mut out: HashMap<String, Held> = HashMap::new();
    for (key, h) in by_stack {
        let label = labels
            .get(key)
            .cloned()
            .unwrap_or_else(|| "[unknown]".into());
        out.entry(label).or_default().add(h);
    }
    out
}

/// Pushes one window of each site, classifies it, and logs and alerts on what changed.
#[allow(clippy::too_many_arguments)]
fn classify_sites(
    pid: u32,
    state: &mut Sites,
    held: HashMap<String, Held>,
    at_secs: f64,
    config: &WatchConfig,
    growth_tier: bool,
    sites: &mut Vec<metrics::SiteSample>,
    alerts: &mut Vec<Alert>,
) {
    let labels: HashSet<String> = state.trends.keys().chain(held.keys()).cloned().collect();
    let span = config.alert_window.as_secs_f64();
    for label in labels {
        let h = held.get(&label).copied().unwrap_or_default();
        let idle = state.idle.entry(label.clone()).or_default();
        *idle = if h.bytes == 0.0 { *idle + 1 } else { 0 };
        if *idle > FORGET_AFTER_WINDOWS {
            state.trends.remove(&label);
            state.idle.remove(&label);
            continue;
        }
        let trend = state.trends.entry(label.clone()).or_default();
        trend.push(h.window(at_secs));
        let class = if growth_tier && label == INSIDE_ALLOCATOR {
            Class::Steady
        } else if growth_tier {
            trend.growth_class()
        } else {
            trend.class()
        };
        let growth = trend.growth_rate(span);
        tracing::debug!(
            pid,
            site = %label,
            bytes = h.bytes,
            old_count = h.old_count,
            class = class.name(),
            "window"
        );
        let flagged = matches!(class, Class::Leaking | Class::Growing);
        if flagged && state.flagged.insert(label.clone()) {
            let line = if growth_tier {
                format!(
                    "bridge-trace: the heap of pid {pid} keeps growing: new memory first touched \
                     at {label}, {}/s over the last {LEAK_WINDOWS} windows ({} so far; the code \
                     that first touches new memory is not always the code that holds it)",
                    human_bytes(growth.max(0.0) as u64),
                    human_bytes(h.bytes as u64),
                )
            } else {
                format!(
                    "bridge-trace: leak at {label} (pid {pid}): holds {} in {} allocations; its \
                     allocations older than {OLD_AFTER_WINDOWS} windows piled up in the last \
                     {LEAK_WINDOWS} windows ({}/s)",
                    human_bytes(h.bytes as u64),
                    h.count.round(),
                    human_bytes(growth.max(0.0) as u64)
                )
            };
            eprintln!("{line}");
            alerts.push(Alert {
                site: label.clone(),
                reason: if growth_tier { "growing" } else { "leaking" },
                line,
            });
        }
        if let Some(limit) = config.alert_growth {
            if flagged && growth >= limit && state.alerted.insert(label.clone()) {
                // Over what the history covers of the alert window: "the last 25s" early on.
                let covered = Duration::from_secs(trend.covered_secs(span).round() as u64);
                let line = format!(
                    "bridge-trace: ALERT: {label} (pid {pid}) grows {}/s over the last {}, above \
                     {}/s",
                    human_bytes(growth as u64),
                    humantime::format_duration(covered.min(config.alert_window)),
                    human_bytes(limit as u64)
                );
                eprintln!("{line}");
                alerts.push(Alert {
                    site: label.clone(),
                    reason: "growth",
                    line,
                });
            }
        }
        sites.push(metrics::SiteSample {
            label,
            class,
            bytes: h.bytes.round() as u64,
            count: h.count.round() as u64,
            old_bytes: h.old_bytes.round() as u64,
            growth_bytes_per_second: growth,
        });
    }
}

/// When sampling stops before a leak could be named: the allocation sites holding the most of
/// what was allocated while sampling, as leads (one or a few windows cannot tell a leak from a
/// cache's turnover).
pub(super) fn suspects(p: &Proc, sample: &metrics::Sample) {
    let mut held: Vec<&metrics::SiteSample> = sample
        .sites
        .iter()
        .filter(|s| !matches!(s.class, Class::Growing | Class::Steady) && s.bytes > 0)
        .collect();
    held.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.label.cmp(&b.label)));
    for s in held.iter().take(3) {
        eprintln!(
            "bridge-trace: {} (pid {}): allocated while sampling and still held: ~{} in ~{} \
             allocations at {} (a lead, not a verdict)",
            p.name,
            sample.pid,
            human_bytes(s.bytes),
            s.count,
            s.label
        );
    }
}

/// Names the stacks not seen before by their site, as `function (file:line)`: for
/// allocations, the first frame above the allocator that is not an allocation wrapper (the
/// well-known ones, `--wrapper`, and those the process's stacks show: [`crate::model::sites`]);
/// for growth, the code that made the heap grow, through malloc or not, past the same wrappers.
/// When a new stack shows a wrapper, every stack is named again.
pub(super) fn label_new_stacks<'a>(
    p: &mut Proc,
    snap: &Snapshot,
    keys: impl Iterator<Item = &'a (u64, u64)>,
    growth: bool,
) {
    let keys: Vec<&(u64, u64)> = keys.collect();
    if label_stacks(p, snap, &keys, growth) {
        if growth {
            p.growth.labels.clear();
        } else {
            p.allocs.labels.clear();
        }
        label_stacks(p, snap, &keys, growth);
    }
}

/// [`label_new_stacks`] once; whether the stacks showed a wrapper not known before.
fn label_stacks(p: &mut Proc, snap: &Snapshot, keys: &[&(u64, u64)], growth: bool) -> bool {
    let labels = if growth {
        &mut p.growth.labels
    } else {
        &mut p.allocs.labels
    };
    let new: Vec<((u64, u64), Vec<u64>)> = keys
        .iter()
        .copied()
        .filter(|k| !labels.contains_key(k))
        .map(|&k| {
            let frames = match k {
                (0, ret) => vec![ret],
                (id, _) => snap
                    .stacks
                    .get(&id)
                    .map(|s| s.frames.clone())
                    .unwrap_or_default(),
            };
            (k, frames)
        })
        .collect();
    if new.is_empty() {
        return false;
    }
    let mut addrs: Vec<u64> = new.iter().flat_map(|(_, f)| f.iter().copied()).collect();
    addrs.sort_unstable();
    addrs.dedup();
    let named = symbolize_addrs(&mut p.symbolizer, &p.maps, &addrs);
    let file = |path: &str| path.rsplit('/').next().unwrap_or_default().to_string();
    let allocator_files: Vec<String> = p.allocators.iter().map(|a| file(&a.path)).collect();
    let in_allocator = |f: &Frame| {
        f.module
            .as_deref()
            .is_some_and(|m| allocator_files.contains(&file(m)))
    };
    for (key, frames) in new {
        // Innermost frame first; inlined frames are listed outermost first per address. A
        // frame in no mapping (a return through a uretprobe's trampoline, whose real return
        // address only the kernel knows) ends what can be said about the stack.
        let known: Vec<&Frame> = frames
            .iter()
            .filter_map(|a| named.get(a).and_then(|fs| fs.last()))
            .take_while(|f| f.module.is_some() || f.function.is_some())
            .collect();
        let wrappers = &p.wrappers;
        let past_wrappers = |frames: &[&Frame]| {
            let run = wrappers.run(frames.iter().map(|f| f.function.as_deref()));
            frames.get(run).map(|f| site_label(f))
        };
        if !growth {
            let names: Vec<Option<&str>> = known.iter().map(|f| f.function.as_deref()).collect();
            wrappers.observe(&mut p.callers, &names);
        }
        let label = if growth {
            // Growth whose stack never leaves the allocator (cut short by a return probe's
            // trampoline while allocations are sampled) says nothing about who grew the heap.
            match known.iter().position(|f| !in_allocator(f)) {
                Some(at) => past_wrappers(&known[at..]).unwrap_or_default(),
                None => INSIDE_ALLOCATOR.to_string(),
            }
        } else {
            past_wrappers(&known).unwrap_or_else(|| "[unknown]".into())
        };
        labels.insert(key, label);
    }
    p.wrappers.promote(&p.callers)
}

/// `function (file:line)`, the file by its last component; `[unknown] (module+0xoffset)`.
pub(super) fn site_label(f: &Frame) -> String {
    let name = f.display_name();
    match (&f.file, f.line, &f.module, f.offset) {
        (Some(file), Some(line), _, _) => {
            format!(
                "{name} ({}:{line})",
                file.rsplit('/').next().unwrap_or(file)
            )
        }
        (_, _, Some(module), Some(offset)) if f.function.is_none() => {
            format!(
                "{name} ({}+{offset:#x})",
                module.rsplit('/').next().unwrap_or(module)
            )
        }
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stacks labelled with one site are one site: bytes, counts and old bytes summed, the
    /// oldest age kept; a stack without a label yet is `[unknown]`, not dropped.
    #[test]
    fn stacks_of_one_site_add_up() {
        let held = |bytes: f64, old: f64, oldest_ns: u64| Held {
            bytes,
            count: 1.0,
            old_bytes: old,
            old_count: if old > 0.0 { 1.0 } else { 0.0 },
            old_seen: u64::from(old > 0.0),
            oldest_ns,
        };
        let labels = HashMap::from([
            ((1, 0x10), "leak_site (leak.c:7)".to_string()),
            ((2, 0x10), "leak_site (leak.c:7)".to_string()),
            ((3, 0x20), "cache_put (cache.c:9)".to_string()),
        ]);
        let by_stack = HashMap::from([
            ((1, 0x10), held(100.0, 100.0, 5_000)),
            ((2, 0x10), held(50.0, 0.0, 9_000)),
            ((3, 0x20), held(7.0, 0.0, 1)),
            ((4, 0x30), held(3.0, 3.0, 2)),
        ]);
        let sites = by_site(&labels, &by_stack);
        assert_eq!(sites.len(), 3);
        let leak = sites["leak_site (leak.c:7)"];
        assert_eq!((leak.bytes, leak.count), (150.0, 2.0));
        assert_eq!(
            (leak.old_bytes, leak.old_count, leak.old_seen),
            (100.0, 1.0, 1)
        );
        assert_eq!(leak.oldest_ns, 9_000);
        assert_eq!(sites["[unknown]"].bytes, 3.0);
        // A stored stack is its id; one that could not be stored, its direct caller.
        assert_eq!(stack_key(7, 0x10), (7, 0));
        assert_eq!(stack_key(0, 0x30), (0, 0x30));
    }
}
