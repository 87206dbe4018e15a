//! `--push`: sends each snapshot, as gzipped pprof (inuse_space / inuse_objects), to a
//! Pyroscope-compatible ingest endpoint (`POST /ingest?name=…&from=…&until=…&format=pprof`, the
//! profile in a multipart form field named `profile`), the HTTP API that Grafana Pyroscope and
//! Grafana Alloy's `pyroscope.receive_http` accept. Sent by [`super::export`].
use std::time::{SystemTime, UNIX_EPOCH};

use super::export::Payload;
use crate::{
    aggregate::Report,
    error::Result,
    render::{render_to_vec, Format, RenderOptions},
};

/// The application name a process's profiles are stored under: `bridge-trace.NAME` with its
/// pid and `labels` (its cgroup and container id under `--cgroup`), in Pyroscope's
/// `name{label=value,...}` form.
pub fn app_name(process: &str, pid: u32, labels: &[(String, String)]) -> String {
    let clean: String = process
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("bridge-trace.{clean}{{pid={pid}");
    for (key, value) in labels {
        // What would end a label or the set.
        let value: String = value
            .chars()
            .map(|c| {
                if matches!(c, ',' | '{' | '}' | '=') {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        name.push_str(&format!(",{key}={value}"));
    }
    name.push('}');
    name
}

/// The ingest URL for one profile of `name` covering `[from, until]`.
pub fn ingest_url(base: &str, name: &str, from: SystemTime, until: SystemTime) -> String {
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let encoded: String = name
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!(
        "{base}/ingest?name={encoded}&from={}&until={}&format=pprof&spyName=bridge-trace",
        secs(from),
        secs(until)
    )
}

/// A multipart/form-data body with one file field, `profile`; returns (content type, body).
pub fn multipart(profile: &[u8]) -> (String, Vec<u8>) {
    let boundary = "bridge-trace-profile-boundary-4f1c9a";
    let mut body = Vec::with_capacity(profile.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"profile\"; \
             filename=\"profile.pb.gz\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(profile);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// One report of process `name` (`pid`), covering `[from, until]`, as the request to send.
pub fn payload(
    url: &str,
    name: &str,
    pid: u32,
    labels: &[(String, String)],
    report: &Report,
    from: SystemTime,
    until: SystemTime,
) -> Result<Payload> {
    let profile = render_to_vec(report, Format::Pprof, RenderOptions::default())?;
    let (content_type, body) = multipart(&profile);
    Ok(Payload {
        url: ingest_url(url, &app_name(name, pid, labels), from, until),
        content_type,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_and_urls() {
        let name = app_name("data bridge", 42, &[]);
        assert_eq!(name, "bridge-trace.data_bridge{pid=42}");
        let labels = [
            (
                "cgroup".to_string(),
                "/system.slice/docker-0a1b.scope".to_string(),
            ),
            ("container_id".to_string(), "0a1b".to_string()),
        ];
        assert_eq!(
            app_name("srv", 7, &labels),
            "bridge-trace.srv{pid=7,cgroup=/system.slice/docker-0a1b.scope,container_id=0a1b}"
        );
        let odd = [("cgroup".to_string(), "/a,b{c}=d".to_string())];
        assert_eq!(
            app_name("srv", 7, &odd),
            "bridge-trace.srv{pid=7,cgroup=/a_b_c__d}"
        );
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            ingest_url("http://p:4040", &name, t, t + Duration::from_secs(60)),
            "http://p:4040/ingest?name=bridge-trace.data_bridge%7Bpid%3D42%7D&from=1700000000\
             &until=1700000060&format=pprof&spyName=bridge-trace"
        );
        let (ct, body) = multipart(b"PPROF");
        assert!(ct.starts_with("multipart/form-data; boundary="));
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("name=\"profile\""));
        assert!(text.contains("\r\n\r\nPPROF\r\n--"));
    }
}
