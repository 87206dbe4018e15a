//! Where snapshots go beyond the machine: each endpoint (`--push` Pyroscope, `--otlp`) has its
//! own sending thread behind a queue of [`QUEUE`] payloads, so that a slow or dead endpoint
//! never stalls tracing and never grows memory: a payload that finds the queue full is dropped
//! and counted. Every send has a timeout; failures are counted (exported as metrics) and said
//! once per endpoint, with a summary when `watch` ends.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{self, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use prost::Message as _;

use crate::{
    aggregate::Report,
    error::{Error, Result},
    render::otlp,
};

/// Payloads waiting per endpoint, besides the one being sent.
pub const QUEUE: usize = 2;
/// The longest one send may take (connecting included).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `watch` waits at its end for what is queued.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One request's worth: where it goes and what it carries.
pub struct Payload {
    pub url: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// What an endpoint did so far.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// An endpoint's figures, for the metrics.
#[derive(Clone, Debug)]
pub struct ExportSample {
    pub exporter: &'static str,
    pub endpoint: String,
    pub sent: u64,
    pub failed: u64,
    pub dropped: u64,
}

/// What an endpoint speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Pyroscope's ingest API, pprof (`--push`).
    Pyroscope,
    /// OTLP/HTTP profiles (`--otlp`).
    Otlp,
}

impl Kind {
    /// The option that names it, as said in messages.
    pub fn option(self) -> &'static str {
        match self {
            Kind::Pyroscope => "--push",
            Kind::Otlp => "--otlp",
        }
    }

    /// Its `exporter` label in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pyroscope => "pyroscope",
            Kind::Otlp => "otlp",
        }
    }
}

/// One endpoint and its sending thread.
pub struct Endpoint {
    pub kind: Kind,
    pub url: String,
    tx: Option<SyncSender<Payload>>,
    counts: Arc<Counts>,
    done: mpsc::Receiver<()>,
}

impl Endpoint {
    pub fn new(kind: Kind, url: &str) -> Result<Endpoint> {
        let (option, exporter) = (kind.option(), kind.name());
        let (tx, rx) = mpsc::sync_channel::<Payload>(QUEUE);
        let (done_tx, done) = mpsc::channel();
        let counts = Arc::new(Counts::default());
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout(SEND_TIMEOUT)
            .build();
        let (c, shown) = (counts.clone(), url.to_string());
        std::thread::Builder::new()
            .name(format!("bridge-trace {exporter}"))
            .spawn(move || {
                for p in rx {
                    let sent = agent
                        .post(&p.url)
                        .set("Content-Type", &p.content_type)
                        .send_bytes(&p.body);
                    match sent {
                        Ok(_) => {
                            c.sent.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            let reason = one_line(&e.to_string());
                            if c.failed.fetch_add(1, Relaxed) == 0 {
                                eprintln!(
                                    "bridge-trace: {option} {shown}: {reason} (further failures \
                                     are counted: bridge_trace_export_failures_total)"
                                );
                            }
                            *c.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                        }
                    }
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::io(format!("starting the {exporter} exporter"), e))?;
        Ok(Endpoint {
            kind,
            url: url.to_string(),
            tx: Some(tx),
            counts,
            done,
        })
    }

    /// Queues a payload, or drops and counts it when the endpoint is behind.
    pub fn offer(&self, payload: Payload) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(payload) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counts.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    pub fn sample(&self) -> ExportSample {
        ExportSample {
            exporter: self.kind.name(),
            endpoint: self.url.clone(),
            sent: self.counts.sent.load(Relaxed),
            failed: self.counts.failed.load(Relaxed),
            dropped: self.counts.dropped.load(Relaxed),
        }
    }

    /// Takes no more payloads: its thread ends once it has sent what is queued.
    pub fn close(&mut self) {
        self.tx.take();
    }

    /// Waits (until `deadline`) for what is queued, then says what was not delivered.
    pub fn finish(mut self, deadline: Instant) {
        self.close();
        let wait = deadline.saturating_duration_since(Instant::now());
        let drained = self.done.recv_timeout(wait).is_ok();
        let s = self.sample();
        if s.failed + s.dropped > 0 || !drained {
            let last = self
                .counts
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            eprintln!(
                "bridge-trace: {} {}: {} snapshot(s) delivered, {} failed, {} dropped (the \
                 endpoint was behind){}{}",
                self.kind.option(),
                self.url,
                s.sent,
                s.failed,
                s.dropped,
                if drained {
                    ""
                } else {
                    ", one still being sent at exit"
                },
                last.map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
}

/// Closes every endpoint, then gives them together at most `wait` to send what is queued.
pub fn finish_all(mut endpoints: Vec<Endpoint>, wait: Duration) {
    let deadline = Instant::now() + wait;
    endpoints.iter_mut().for_each(Endpoint::close);
    for e in endpoints {
        e.finish(deadline);
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The OTLP/HTTP URL profiles are posted to: `URL/v1development/profiles`, unless the URL
/// names that path already.
pub fn otlp_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1development/profiles") {
        base.to_string()
    } else {
        format!("{base}/v1development/profiles")
    }
}

/// A report as an OTLP profiles request (protobuf), with `extra` resource attributes.
pub fn otlp_payload(
    url: &str,
    report: &Report,
    end: SystemTime,
    extra: &[(String, String)],
) -> Payload {
    Payload {
        url: otlp_url(url),
        content_type: "application/x-protobuf".into(),
        body: otlp::request(report, end, extra).encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        net::TcpListener,
    };

    #[test]
    fn otlp_path() {
        assert_eq!(
            otlp_url("http://c:4318"),
            "http://c:4318/v1development/profiles"
        );
        assert_eq!(
            otlp_url("http://c:4318/v1development/profiles/"),
            "http://c:4318/v1development/profiles"
        );
    }

    fn payload(url: &str) -> Payload {
        Payload {
            url: url.into(),
            content_type: "application/octet-stream".into(),
            body: vec![7; 1000],
        }
    }

    /// An endpoint that accepts connections and never answers: offers never block, what the
    /// queue cannot hold is dropped and counted, and `finish` returns within its wait.
    #[test]
    fn a_stalled_endpoint_never_blocks_and_counts_its_drops() {
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/x", silent.local_addr().unwrap());
        let e = Endpoint::new(Kind::Otlp, &url).unwrap();
        let started = Instant::now();
        for _ in 0..20 {
            e.offer(payload(&url));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        // At most QUEUE waiting and one being sent: the rest dropped.
        let s = e.sample();
        assert!(s.dropped >= 20 - QUEUE as u64 - 1, "{s:?}");
        let started = Instant::now();
        e.finish(Instant::now() + Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(silent);
    }

    /// A working endpoint gets every payload; a refused one counts failures.
    #[test]
    fn sent_and_failed_are_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/x", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (stream, _) = listener.accept().unwrap();
                let mut r = BufReader::new(stream);
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                r.into_inner()
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .unwrap();
            }
        });
        let e = Endpoint::new(Kind::Pyroscope, &url).unwrap();
        e.offer(payload(&url));
        // One at a time, so that the queue never fills.
        while e.sample().sent < 1 {
            std::thread::sleep(Duration::from_millis(10));
        }
        e.offer(payload(&url));
        while e.sample().sent < 2 {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!((e.sample().failed, e.sample().dropped), (0, 0));
        e.finish(Instant::now() + Duration::from_secs(5));
        server.join().unwrap();

        // Nothing listens on a port just freed: refused.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = format!("http://127.0.0.1:{port}/x");
        let e = Endpoint::new(Kind::Otlp, &dead).unwrap();
        e.offer(payload(&dead));
        while e.sample().failed < 1 {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(e.sample().sent, 0);
    }
}
