//! Prometheus metrics of a watch: encoded with prometheus-client after every window, served
//! as they were last encoded on `GET /metrics`. Sites are labelled by a short, stable label
//! (leaf function and source line) and only the top [`TOP_SITES`] by growth are exported, so
//! that the number of series stays bounded.
use std::sync::Arc;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::watch,
};

use super::classify::Class;

/// Sites exported per window.
pub const TOP_SITES: usize = 20;

/// What one window's metrics say.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub pid: u32,
    pub rss_bytes: u64,
    pub outstanding_bytes: u64,
    pub allocs: u64,
    pub frees: u64,
    /// Allocations and stacks lost (maps full, lost returns, missed probe runs).
    pub dropped: u64,
    pub tier: &'static str,
    pub windows: u64,
    pub bpf_cpu_seconds: f64,
    /// CPU time of bridge-trace's own process (user and system) so far.
    pub tracer_cpu_seconds: f64,
    pub sites: Vec<SiteSample>,
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

/// The OpenMetrics text of one sample.
pub fn encode_sample(s: &Sample) -> String {
    let mut registry = Registry::with_prefix("bridge_trace");
    let pid = vec![("pid".to_string(), s.pid.to_string())];
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let family = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        family.get_or_create(&pid).set(value);
        registry.register(name, help, family);
    };
    gauge(
        &mut registry,
        "rss_bytes",
        "Resident set size of the process",
        s.rss_bytes as f64,
    );
    gauge(
        &mut registry,
        "outstanding_bytes",
        "Bytes allocated and not freed since watching started",
        s.outstanding_bytes as f64,
    );
    gauge(
        &mut registry,
        "windows",
        "Windows observed",
        s.windows as f64,
    );
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let family = Family::<Labels, Counter>::default();
        family.get_or_create(&pid).inc_by(value);
        registry.register(name, help, family);
    };
    counter(&mut registry, "allocations", "Allocations seen", s.allocs);
    counter(&mut registry, "frees", "Frees seen", s.frees);
    counter(
        &mut registry,
        "dropped_events",
        "Events not accounted (maps full, lost returns, skipped probe runs)",
        s.dropped,
    );
    let cpu = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    cpu.get_or_create(&pid).inc_by(s.bpf_cpu_seconds);
    registry.register(
        "bpf_cpu_seconds",
        "CPU time of bridge-trace's eBPF programs (with kernel.bpf_stats_enabled)",
        cpu,
    );
    let own = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    own.get_or_create(&pid).inc_by(s.tracer_cpu_seconds);
    registry.register(
        "tracer_cpu_seconds",
        "CPU time of bridge-trace's own process, user and system",
        own,
    );
    let tier = Family::<Labels, Gauge>::default();
    tier.get_or_create(&vec![
        ("pid".to_string(), s.pid.to_string()),
        ("tier".to_string(), s.tier.to_string()),
    ])
    .set(1);
    registry.register("tier", "Overhead tier in use", tier);

    let site_gauge = || Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let (bytes, old, growth) = (site_gauge(), site_gauge(), site_gauge());
    let leaking = Family::<Labels, Gauge>::default();
    let mut leaking_sites = 0;
    for site in s.sites.iter().take(TOP_SITES) {
        let labels = vec![
            ("pid".to_string(), s.pid.to_string()),
            ("site".to_string(), site.label.clone()),
            ("class".to_string(), site.class.name().to_string()),
        ];
        bytes.get_or_create(&labels).set(site.bytes as f64);
        old.get_or_create(&labels).set(site.old_bytes as f64);
        growth
            .get_or_create(&labels)
            .set(site.growth_bytes_per_second);
    }
    for site in &s.sites {
        if site.class == Class::Leaking {
            leaking_sites += 1;
        }
    }
    leaking.get_or_create(&pid).set(leaking_sites);
    registry.register(
        "site_outstanding_bytes",
        "Bytes a call site holds, for the sites growing fastest",
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
    registry.register("leaking_sites", "Call sites classified as leaking", leaking);
    let mut text = String::new();
    // Encoding into a String cannot fail.
    let _ = encode(&mut text, &registry);
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
            outstanding_bytes: 3000,
            allocs: 10,
            frees: 4,
            tier: "full",
            windows: 6,
            tracer_cpu_seconds: 1.5,
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
        let text = encode_sample(&sample);
        for line in [
            "bridge_trace_rss_bytes{pid=\"7\"} 4096.0",
            "bridge_trace_allocations_total{pid=\"7\"} 10",
            "bridge_trace_tier{pid=\"7\",tier=\"full\"} 1",
            "bridge_trace_leaking_sites{pid=\"7\"} 1",
            "bridge_trace_tracer_cpu_seconds_total{pid=\"7\"} 1.5",
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
}
