//! `watch` against a running service with a leak, a cache and churn (tests/fixtures/patterns.c):
//! the leak is flagged within a few windows, on stderr and in the Prometheus metrics it serves;
//! the cache and the churn never are; the service is unharmed.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

mod common;
use common::*;

fn patterns() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(TMP).join("watch");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("patterns");
        gcc(&[
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-o",
            out.to_str().unwrap(),
            repo().join("tests/fixtures/patterns.c").to_str().unwrap(),
        ]);
        out
    })
}

/// Starts the fixture and waits until it runs; killed if a failed assertion unwinds.
fn start_patterns() -> KillOnDrop {
    let mut service = KillOnDrop(
        Command::new(patterns())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(service.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    service
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET /metrics, the body (empty while nothing listens yet).
fn scrape(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// (site, class) of every `site_outstanding_bytes` series.
fn classes(metrics: &str) -> Vec<(String, String)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("bridge_trace_site_outstanding_bytes{"))
        .filter_map(|l| {
            let labels = &l[l.find('{')? + 1..l.find('}')?];
            let get = |name: &str| {
                let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
                let end = start + labels[start..].find('"')?;
                Some(labels[start..end].to_string())
            };
            Some((get("site")?, get("class")?))
        })
        .collect()
}

/// Kills the child when a failed assertion unwinds past it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn leak_is_flagged_cache_and_churn_are_not() {
    let _g = lock();
    let mut service = start_patterns();

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let pid = service.0.id().to_string();
    let dir = scratch("watch-bundles");
    let hook_log = dir.join("hook.log");
    let hook = format!(
        "echo \"$BRIDGE_TRACE_REASON|$BRIDGE_TRACE_SITE|$BRIDGE_TRACE_BUNDLE\" >> {}",
        hook_log.display()
    );
    let watch = Command::new(BIN)
        .args([
            "watch",
            "--pid",
            &pid,
            "--interval",
            "1s",
            "--duration",
            "14s",
        ])
        .args(["--metrics-addr", &addr])
        .args(["--out-dir", dir.to_str().unwrap(), "--snapshot-every", "3s"])
        .args([
            "--keep",
            "2",
            "--alert-growth",
            "10KiB/s",
            "--alert-window",
            "5s",
        ])
        .args(["--on-alert", &hook])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut seen: Vec<(f64, String, String)> = Vec::new();
    while started.elapsed() < Duration::from_secs(13) {
        std::thread::sleep(Duration::from_millis(500));
        let at = started.elapsed().as_secs_f64();
        seen.extend(classes(&scrape(port)).into_iter().map(|(s, c)| (at, s, c)));
    }
    let output = watch.wait_with_output().unwrap();
    assert_ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);

    let is = |site: &str, class: &str| {
        seen.iter()
            .filter(|(_, s, c)| s.starts_with(site) && c == class)
            .map(|(at, _, _)| *at)
            .next()
    };
    let flagged = is("leak_site (patterns.c:", "leaking")
        .unwrap_or_else(|| panic!("the leak was never flagged: {seen:#?}\n{stderr}"));
    // Five windows of growth of allocations older than two windows: flagged by about 8 s.
    assert!(flagged < 10.0, "flagged after {flagged:.1} s");
    assert!(
        stderr.contains("leak at leak_site (patterns.c:"),
        "no log line: {stderr}"
    );
    for site in ["cache_put", "churn_site"] {
        assert_eq!(
            is(site, "leaking"),
            None,
            "{site} flagged as a leak: {seen:#?}"
        );
    }
    assert!(
        is("cache_put (patterns.c:", "cache").is_some(),
        "the cache was never recognized: {seen:#?}"
    );

    // The alerts: an incident bundle with the leak in its flamegraph, and the hook, run for
    // the leak and for its growth past 10 KiB/s.
    let hooks = std::fs::read_to_string(&hook_log).unwrap_or_default();
    for reason in ["leaking", "growth"] {
        assert!(
            hooks
                .lines()
                .any(|l| l.starts_with(&format!("{reason}|leak_site (patterns.c:"))),
            "hook not run for {reason}: {hooks:?}\n{stderr}"
        );
    }
    let bundle = PathBuf::from(hooks.lines().next().unwrap().rsplit('|').next().unwrap());
    assert!(bundle.starts_with(&dir), "{bundle:?}");
    let folded = std::fs::read_to_string(bundle.join("leaks.folded")).unwrap();
    assert!(
        folded.lines().any(|l| l.contains(";leak_site ")),
        "{folded}"
    );
    let alert = std::fs::read_to_string(bundle.join("alert.txt")).unwrap();
    assert!(alert.contains("leak at leak_site"), "{alert}");
    for file in ["leaks.svg", "leaks.pb.gz", "report.json", "report.txt"] {
        assert!(
            bundle.join(file).is_file(),
            "{file} missing from {bundle:?}"
        );
    }
    // Snapshots every 3 s for 14 s, the newest two kept.
    let snapshots = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("snapshot-")
        })
        .count();
    assert_eq!(snapshots, 2, "retention");

    // The service is unharmed and stops cleanly.
    assert!(service.0.try_wait().unwrap().is_none(), "the service died");
    signal(&service.0, libc::SIGTERM);
    assert!(service.0.wait().unwrap().success());
}

/// GET `path` on 127.0.0.1:`port`: the body.
fn get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(request.as_bytes());
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// A real Prometheus server (Debian's) scrapes `watch`; the leak is read back through its own
/// query API.
#[test]
fn prometheus_scrapes_the_leak() {
    let _g = lock();
    let dir = scratch("prometheus");
    let service = start_patterns();
    let (metrics_port, prometheus_port) = (free_port(), free_port());
    let watch = KillOnDrop(
        Command::new(BIN)
            .args([
                "watch",
                "--pid",
                &service.0.id().to_string(),
                "--interval",
                "1s",
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: bridge-trace\n    \
             static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (cargo xtask setup installs it)"),
    );
    // The leak needs about 8 windows; Prometheus then scrapes it within a second.
    let query =
        "/api/v1/query?query=bridge_trace_site_outstanding_bytes%7Bclass%3D%22leaking%22%7D";
    let started = Instant::now();
    let mut answer = String::new();
    while started.elapsed() < Duration::from_secs(25) {
        std::thread::sleep(Duration::from_secs(1));
        answer = get(prometheus_port, query);
        if answer.contains("leak_site") {
            break;
        }
    }
    drop(watch);
    let v: serde_json::Value = serde_json::from_str(&answer)
        .unwrap_or_else(|e| panic!("Prometheus answered {answer:?}: {e}"));
    assert_eq!(v["status"], "success", "{v}");
    let results = v["data"]["result"].as_array().unwrap();
    let leak = results
        .iter()
        .find(|r| {
            r["metric"]["site"]
                .as_str()
                .is_some_and(|s| s.starts_with("leak_site (patterns.c:"))
        })
        .unwrap_or_else(|| panic!("Prometheus has no leaking leak_site: {v}"));
    assert_eq!(leak["metric"]["job"], "bridge-trace");
    let bytes: f64 = leak["value"][1].as_str().unwrap().parse().unwrap();
    assert!(bytes >= 5.0 * 1000.0, "{leak}");
    assert!(
        results.iter().all(|r| r["metric"]["site"]
            .as_str()
            .is_some_and(|s| !s.starts_with("cache_put") && !s.starts_with("churn_site"))),
        "{v}"
    );
}

/// `top` prints a frame per window; the leak rises to the top, marked as such.
#[test]
fn top_shows_the_leak_first() {
    let _g = lock();
    let service = start_patterns();
    let pid = service.0.id().to_string();
    let output = Command::new(BIN)
        .args(["top", "--pid", &pid, "--interval", "1s", "--duration", "9s"])
        .output()
        .unwrap();
    assert_ok(&output);
    let text = String::from_utf8_lossy(&output.stdout);
    let frames: Vec<&str> = text.split("bridge-trace top: ").skip(1).collect();
    assert!(frames.len() >= 7, "one frame per window: {text}");
    let last = frames.last().unwrap();
    let first_site = last.lines().nth(2).unwrap_or_default();
    assert!(
        first_site.starts_with("leaking") && first_site.contains("leak_site (patterns.c:"),
        "{last}"
    );
    assert!(
        !last
            .lines()
            .any(|l| l.starts_with("leaking") && l.contains("cache_put")),
        "{last}"
    );
}

/// Bad input: one line on stderr, exit code 2, nothing traced.
#[test]
fn watch_errors_are_one_line() {
    let _g = lock();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let me = std::process::id().to_string();
    let addr = format!("127.0.0.1:{port}");
    for (args, needle) in [
        (
            vec!["watch", "--pid", &me, "--metrics-addr", &addr],
            "cannot serve metrics on",
        ),
        (
            vec!["watch", "--pid", &me, "--out-dir", "/nonexistent/dir"],
            "no such directory",
        ),
        (
            vec!["watch", "--pid", &me, "--alert-growth", "fast"],
            "invalid rate 'fast'",
        ),
        (
            vec!["watch", "--pid", &me, "--interval", "1ms"],
            "--interval",
        ),
        (vec!["top", "--pid", "0"], "--pid 0"),
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// `--exe`: the service is restarted while watched; the new process is picked up and its
/// leak flagged.
#[test]
fn exe_restarted_service_is_picked_up() {
    let _g = lock();
    let dir = scratch("watch-exe");
    // A copy of its own, so that no other test's fixture runs the same executable.
    let exe = dir.join("patterns-service");
    std::fs::copy(patterns(), &exe).unwrap();
    let port = free_port();
    let watch = Command::new(BIN)
        .args(["watch", "--exe", exe.to_str().unwrap(), "--interval", "1s"])
        .args([
            "--duration",
            "20s",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = || {
        let mut child = KillOnDrop(Command::new(&exe).stdout(Stdio::piped()).spawn().unwrap());
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        child
    };
    let pid_series = |pid: u32| format!("bridge_trace_rss_bytes{{pid=\"{pid}\"}}");
    let wait_for = |what: &dyn Fn(&str) -> bool, secs: u64| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(secs) {
            if what(&scrape(port)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        false
    };
    let first = start();
    let first_pid = first.0.id();
    assert!(
        wait_for(&|m| m.contains(&pid_series(first_pid)), 6),
        "the first process was not watched"
    );
    signal(&first.0, libc::SIGTERM);
    drop(first);
    let second = start();
    let second_pid = second.0.id();
    let leak = format!("pid=\"{second_pid}\",site=\"leak_site (patterns.c:");
    assert!(
        wait_for(
            &|m| m
                .lines()
                .any(|l| l.contains(&leak) && l.contains("class=\"leaking\"")),
            12
        ),
        "the restarted process's leak was not flagged: {}",
        scrape(port)
    );
    drop(second);
    let output = watch.wait_with_output().unwrap();
    assert_ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("pid {first_pid} exited")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("(pid {second_pid})")), "{stderr}");
}
