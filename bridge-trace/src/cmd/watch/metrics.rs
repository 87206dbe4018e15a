//! Prometheus metrics of a watch: encoded with prometheus-client after every window, served
//! as they were last encoded on `GET /metrics`. Sites are labelled by a short, stable label
//! (leaf function and source line) and only the top [`TOP_SITES`] by growth are exported, so
//! that the number of series stays bounded.
use std::sync::Arc;

use prometheus_client::{
    encoding::text::encode as encode_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::watch,
};

use crate::model::classify::Class;

/// Sites exported per window.
pub const TOP_SITES: usize = 20;

/// What one window's metrics say about one process.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub pid: u32,
    pub rss_bytes: u64,
    /// Estimated bytes allocated and not freed since its allocations were traced (0 in the
    /// growth tier).
    /// None in the growth tier, where allocations are not traced (not 0: nothing says the
    /// process holds nothing).
    pub outstanding_bytes: Option<u64>,
    /// Heap growth seen since watching started: brk and anonymous mappings (net of what was
    /// given back), and pages touched for the first time.
    pub heap_growth_bytes: i64,
    pub faulted_bytes: u64,
    pub windows: u64,
    pub sites: Vec<SiteSample>,
    /// Labels every series of the process carries beyond its pid (its cgroup, a container id).
    pub labels: Vec<(String, String)>,
}

/// What one window's metrics say about the tracer itself.
#[derive(Clone, Debug, Default)]
pub struct TracerSample {
    pub allocs: u64,
    pub frees: u64,
    pub unsampled: u64,
    pub growth_events: u64,
    /// Allocations and stacks lost (maps full, lost returns, missed probe runs).
    pub dropped: u64,
    pub tier: &'static str,
    pub sample_interval_bytes: u64,
    /// The tracer's measured cost to the traced processes, in CPUs (0.01 = 1 % of one CPU).
    pub overhead: f64,
    pub overhead_budget: Option<f64>,
    pub tier_changes: u64,
    pub bpf_cpu_seconds: f64,
    /// CPU time of bridge-trace's own process (user and system) so far.
    pub tracer_cpu_seconds: f64,
    pub processes: usize,
    /// Each exporter's deliveries, failures and drops.
    pub exports: Vec<super::export::ExportSample>,
}

#[derive(Clone, Debug)]
pub struct SiteSample {
    pub label: String,
    pub class: Class,
    pub bytes: u64,
    pub count: u64,
    pub old_bytes: u64,
    pub growth_bytes_per_second: f64,
}

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;
type CounterF = Counter<f64, std::sync::atomic::AtomicU64>;

/// The labels of a process's series: its pid, then its own (cgroup, container id).
fn process_labels(s: &Sample) -> Labels {
    let mut labels = vec![("pid".to_string(), s.pid.to_string())];
    labels.extend(s.labels.iter().cloned());
    labels
}

/// The OpenMetrics text of one window: the tracer's own figures, then each process's.
pub fn encode(t: &TracerSample, samples: &[Sample]) -> String {
    let mut registry = Registry::with_prefix("bridge_trace");
    let none: Labels = Vec::new();
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let family = Family::<Labels, GaugeF>::default();
        family.get_or_create(&none).set(value);
        registry.register(name, help, family);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let family = Family::<Labels, Counter>::default();
        family.get_or_create(&none).inc_by(value);
        registry.register(name, help, family);
    };
    let seconds = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let family = Family::<Labels, CounterF>::default();
        family.get_or_create(&none).inc_by(value);
        registry.register(name, help, family);
    };
    counter(
        &mut registry,
        "allocations",
        "Allocations recorded",
        t.allocs,
    );
    counter(
        &mut registry,
        "frees",
        "Frees of recorded allocations",
        t.frees,
    );
    counter(
        &mut registry,
        "unsampled_allocations",
        "Allocations the byte sampler let pass unrecorded",
        t.unsampled,
    );
    counter(
        &mut registry,
        "growth_events",
        "Heap growth events seen (brk, anonymous mmap/munmap/mremap, first-touch faults)",
        t.growth_events,
    );
    counter(
        &mut registry,
        "dropped_events",
        "Events not accounted (maps full, lost returns, skipped probe runs)",
        t.dropped,
    );
    counter(
        &mut registry,
        "tier_changes",
        "Changes of tier or sampling interval made to stay inside the overhead budget",
        t.tier_changes,
    );
    seconds(
        &mut registry,
        "bpf_cpu_seconds",
        "Run time of bridge-trace's eBPF programs",
        t.bpf_cpu_seconds,
    );
    seconds(
        &mut registry,
        "tracer_cpu_seconds",
        "CPU time of bridge-trace's own process, user and system",
        t.tracer_cpu_seconds,
    );
    gauge(
        &mut registry,
        "overhead_cpus",
        "Measured cost of tracing to the traced processes, in CPUs (probe traps and programs)",
        t.overhead,
    );
    if let Some(budget) = t.overhead_budget {
        gauge(
            &mut registry,
            "overhead_budget_cpus",
            "The overhead budget (--max-overhead), in CPUs",
            budget,
        );
    }
    gauge(
        &mut registry,
        "sample_interval_bytes",
        "Mean bytes between sampled allocations (0: every allocation)",
        t.sample_interval_bytes as f64,
    );
    gauge(
        &mut registry,
        "processes",
        "Processes watched",
        t.processes as f64,
    );
    let tier = Family::<Labels, Gauge>::default();
    tier.get_or_create(&vec![("tier".to_string(), t.tier.to_string())])
        .set(1);
    registry.register("tier", "Overhead tier in use", tier);

    let (sent, failed, dropped) = (
        Family::<Labels, Counter>::default(),
        Family::<Labels, Counter>::default(),
        Family::<Labels, Counter>::default(),
    );
    for e in &t.exports {
        let labels = vec![
            ("exporter".to_string(), e.exporter.to_string()),
            ("endpoint".to_string(), e.endpoint.clone()),
        ];
        sent.get_or_create(&labels).inc_by(e.sent);
        failed.get_or_create(&labels).inc_by(e.failed);
        dropped.get_or_create(&labels).inc_by(e.dropped);
    }
    if !t.exports.is_empty() {
        registry.register("export_sent", "Snapshots an exporter delivered", sent);
        registry.register(
            "export_failures",
            "Snapshots an exporter could not deliver (refused, timed out, error status)",
            failed,
        );
        registry.register(
            "export_dropped",
            "Snapshots dropped because the exporter's endpoint was behind (its queue full)",
            dropped,
        );
    }

    let per_pid = || Family::<Labels, GaugeF>::default();
    let (rss, outstanding, heap, faulted, windows) =
        (per_pid(), per_pid(), per_pid(), per_pid(), per_pid());
    let site_gauge = || Family::<Labels, GaugeF>::default();
    let (bytes, old, growth) = (site_gauge(), site_gauge(), site_gauge());
    let leaking = Family::<Labels, Gauge>::default();
    for s in samples {
        let pid = process_labels(s);
        rss.get_or_create(&pid).set(s.rss_bytes as f64);
        if let Some(bytes) = s.outstanding_bytes {
            outstanding.get_or_create(&pid).set(bytes as f64);
        }
        heap.get_or_create(&pid).set(s.heap_growth_bytes as f64);
        faulted.get_or_create(&pid).set(s.faulted_bytes as f64);
        windows.get_or_create(&pid).set(s.windows as f64);
        for site in s.sites.iter().take(TOP_SITES) {
            let mut labels = pid.clone();
            labels.push(("site".to_string(), site.label.clone()));
            labels.push(("class".to_string(), site.class.name().to_string()));
            bytes.get_or_create(&labels).set(site.bytes as f64);
            old.get_or_create(&labels).set(site.old_bytes as f64);
            growth
                .get_or_create(&labels)
                .set(site.growth_bytes_per_second);
        }
        let n = s
            .sites
            .iter()
            .filter(|site| matches!(site.class, Class::Leaking | Class::Growing))
            .count();
        leaking.get_or_create(&pid).set(n as i64);
    }
    registry.register("rss_bytes", "Resident set size of the process", rss);
    registry.register(
        "outstanding_bytes",
        "Bytes allocated and not freed since allocations were traced (estimated when sampled)",
        outstanding,
    );
    registry.register(
        "heap_growth_bytes",
        "Net bytes the heap grew by brk and anonymous mappings since watching started",
        heap,
    );
    registry.register(
        "faulted_bytes",
        "Bytes of memory touched for the first time since watching started",
        faulted,
    );
    registry.register("windows", "Windows observed", windows);
    registry.register(
        "site_outstanding_bytes",
        "Bytes a call site holds (growth tier: its heap growth), for the top sites",
        bytes,
    );
    registry.register(
        "site_old_bytes",
        "Bytes a call site holds in allocations older than two windows",
        old,
    );
    registry.register(
        "site_growth_bytes_per_second",
        "Growth of a call site's memory over the alert window",
        growth,
    );
    registry.register(
        "leaking_sites",
        "Call sites classified as leaking (or, in the growth tier, growing)",
        leaking,
    );
    let mut text = String::new();
    // Encoding into a String cannot fail.
    let _ = encode_text(&mut text, &registry);
    text
}

/// Serves the latest encoded metrics on `GET /metrics` until the sender is dropped.
pub async fn serve(listener: TcpListener, latest: watch::Receiver<Arc<String>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let body = latest.borrow().clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            // Read the request head (bounded); only its first line matters.
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let first = request.split(|&b| b == b'\n').next().unwrap_or_default();
            let (status, content_type, body): (&str, &str, &[u8]) =
                if first.starts_with(b"GET /metrics ") || first.starts_with(b"GET /metrics?") {
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        body.as_bytes(),
                    )
                } else {
                    (
                        "404 Not Found",
                        "text/plain",
                        b"bridge-trace: GET /metrics\n",
                    )
                };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_are_labelled_and_escaped() {
        let sample = Sample {
            pid: 7,
            rss_bytes: 4096,
            outstanding_bytes: Some(3000),
            windows: 6,
            sites: vec![
                SiteSample {
                    label: "reject_message (data-bridge.c:193)".into(),
                    class: Class::Leaking,
                    bytes: 2000,
                    count: 2,
                    old_bytes: 1000,
                    growth_bytes_per_second: 100.0,
                },
                SiteSample {
                    label: "quote\"d".into(),
                    class: Class::Cache,
                    bytes: 1000,
                    count: 1,
                    old_bytes: 1000,
                    growth_bytes_per_second: 0.0,
                },
            ],
            ..Sample::default()
        };
        let tracer = TracerSample {
            allocs: 10,
            frees: 4,
            tier: "sampled",
            sample_interval_bytes: 524288,
            tracer_cpu_seconds: 1.5,
            overhead: 0.004,
            overhead_budget: Some(0.01),
            exports: vec![super::super::export::ExportSample {
                exporter: "otlp",
                endpoint: "http://c:4318".into(),
                sent: 3,
                failed: 2,
                dropped: 1,
            }],
            ..TracerSample::default()
        };
        let text = encode(&tracer, &[sample]);
        for line in [
            "bridge_trace_rss_bytes{pid=\"7\"} 4096.0",
            "bridge_trace_allocations_total 10",
            "bridge_trace_tier{tier=\"sampled\"} 1",
            "bridge_trace_sample_interval_bytes 524288.0",
            "bridge_trace_overhead_cpus 0.004",
            "bridge_trace_overhead_budget_cpus 0.01",
            "bridge_trace_leaking_sites{pid=\"7\"} 1",
            "bridge_trace_tracer_cpu_seconds_total 1.5",
            "bridge_trace_export_failures_total{exporter=\"otlp\",endpoint=\"http://c:4318\"} 2",
            "bridge_trace_export_dropped_total{exporter=\"otlp\",endpoint=\"http://c:4318\"} 1",
            "bridge_trace_site_outstanding_bytes{pid=\"7\",site=\"reject_message \
             (data-bridge.c:193)\",class=\"leaking\"} 2000.0",
            "bridge_trace_site_outstanding_bytes{pid=\"7\",site=\"quote\\\"d\",class=\"cache\"} \
             1000.0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    /// A site of one byte classified leaking.
    fn one_leaking_site() -> SiteSample {
        SiteSample {
            label: "leak (a.c:1)".into(),
            class: Class::Leaking,
            bytes: 1,
            count: 1,
            old_bytes: 1,
            growth_bytes_per_second: 1.0,
        }
    }

    /// Every series the shipped alert rules (deploy/prometheus) read is one watch exports
    /// under that name: a renamed metric fails here, not silently in a fleet.
    #[test]
    fn alert_rules_read_series_watch_exports() {
        let rules = include_str!("../../../../deploy/prometheus/bridge-trace.rules.yml");
        let sample = Sample {
            pid: 7,
            sites: vec![one_leaking_site()],
            outstanding_bytes: Some(1),
            ..Sample::default()
        };
        let tracer = TracerSample {
            tier: "full",
            overhead_budget: Some(0.01),
            exports: vec![super::super::export::ExportSample {
                exporter: "otlp",
                endpoint: "http://c:4318".into(),
                sent: 0,
                failed: 1,
                dropped: 0,
            }],
            ..TracerSample::default()
        };
        let text = encode(&tracer, &[sample]);
        let exported: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let mut read = 0;
        for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("bridge_trace_") && word.len() > "bridge_trace_".len() {
                read += 1;
                assert!(
                    exported.contains(word),
                    "the rules read {word}, not exported"
                );
            }
        }
        assert!(read >= 8, "{read} series read");
    }

    #[test]
    fn a_cgroups_processes_carry_its_labels() {
        let sample = Sample {
            pid: 7,
            sites: vec![one_leaking_site()],
            labels: vec![
                ("cgroup".into(), "/system.slice/docker-ab.scope".into()),
                ("container_id".into(), "ab".into()),
            ],
            ..Sample::default()
        };
        let text = encode(&TracerSample::default(), &[sample]);
        let labels = "pid=\"7\",cgroup=\"/system.slice/docker-ab.scope\",container_id=\"ab\"";
        for line in [
            format!("bridge_trace_rss_bytes{{{labels}}} 0.0"),
            format!("bridge_trace_site_outstanding_bytes{{{labels},site=\"leak (a.c:1)\",class=\"leaking\"}} 1.0"),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
