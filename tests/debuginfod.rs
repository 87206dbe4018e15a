//! debuginfod: a stripped fixture (tests/fixtures/wrappers.cpp, C++ built -O2 without frame
//! pointers) has its frames named from its debug file only when a debuginfod server has it:
//! Debian's own `debuginfod`, started on loopback over a directory holding that one debug
//! file. `record` fetches it (`--debuginfod URL`) into the client cache, `report` names a
//! capture from the cache once the server and the program are gone (`DEBUGINFOD_URLS`), and
//! with neither server nor cache each module is said once and its frames stay `[unknown]`.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde_json::Value;

mod common;
use common::*;

/// The fixture, stripped of every symbol and of its debug information, beside a directory
/// holding only its debug file (objcopy --only-keep-debug), and the build-id they share.
struct Fixture {
    stripped: PathBuf,
    served: PathBuf,
    build_id: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = Path::new(TMP).join("debuginfod");
        let served = dir.join("served");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&served).unwrap();
        let full = dir.join("wrappers");
        build_wrappers(&full);
        let stripped = dir.join("wrappers-stripped");
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {out:?}");
            out
        };
        run(Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&full)
            .arg(served.join("wrappers.debug")));
        run(Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&stripped)
            .arg(&full));
        let notes = run(Command::new("readelf").arg("-nS").arg(&stripped));
        let notes = String::from_utf8_lossy(&notes.stdout);
        assert!(
            !notes.contains(".symtab") && !notes.contains(".debug_info"),
            "not stripped: {notes}"
        );
        let build_id = notes
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .unwrap_or_else(|| panic!("no build-id: {notes}"))
            .to_string();
        Fixture {
            stripped,
            served,
            build_id,
        }
    })
}

/// Debian's debuginfod, serving `dir` on a loopback port once it has indexed the fixture's
/// debug file; killed when dropped.
struct Server {
    _child: KillOnDrop,
    port: u16,
}

impl Server {
    fn start(fixture: &Fixture, scratch: &Path) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = KillOnDrop(
            Command::new("debuginfod")
                .arg("-F")
                .arg(&fixture.served)
                .args(["-p", &port.to_string()])
                .arg("-d")
                .arg(scratch.join("index.sqlite"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(scratch.join("debuginfod.log")).unwrap())
                .spawn()
                .expect("debuginfod (Debian's debuginfod package; `cargo xtask setup`)"),
        );
        let path = format!("/buildid/{}/debuginfo", fixture.build_id);
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(port, &path).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "debuginfod did not serve {path} in 60 s: {}",
                std::fs::read_to_string(scratch.join("debuginfod.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Server {
            _child: child,
            port,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// `bridge-trace ARGS`, with this debuginfod cache and DEBUGINFOD_URLS as given (unset:
/// `None`).
fn bridge_trace(args: &[&str], cache: &Path, urls: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("DEBUGINFOD_CACHE_PATH", cache)
        .env_remove("DEBUGINFOD_URLS")
        .stdin(Stdio::null());
    if let Some(urls) = urls {
        cmd.env("DEBUGINFOD_URLS", urls);
    }
    let out = cmd.output().unwrap();
    assert_ok(&out);
    out
}

/// Records `program`, the stripped fixture, into `dir`: its report and the truth it wrote.
fn record_stripped(
    program: &Path,
    dir: &Path,
    extra: &[&str],
    cache: &Path,
) -> (Value, Sites, String) {
    let o = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let mut args = vec!["record", "--quiet", "--wrapper", "pool_take"];
    args.extend_from_slice(extra);
    let (json_out, truth_out) = (o("r.json"), o("truth"));
    args.extend(["-o", &json_out, "--"]);
    args.extend([program.to_str().unwrap(), "wrappers", &truth_out]);
    let out = bridge_trace(&args, cache, None);
    (
        json(&dir.join("r.json")),
        truth(&dir.join("truth")),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The sites of the truth as the report names them: bytes and counts by leaf function.
fn truth_sites(report: &Value, truth: &Sites) -> Sites {
    let got = by_leaf(report);
    truth
        .keys()
        .filter_map(|site| Some((site.clone(), *got.get(site)?)))
        .collect()
}

/// The lines of `said` about the stripped fixture's debug file.
fn said_about_fixture(said: &str) -> Vec<&str> {
    said.lines()
        .filter(|l| l.contains("debuginfod: no debug file for") && l.contains("wrappers-stripped"))
        .collect()
}

#[test]
fn stripped_frames_are_named_only_through_the_server() {
    let _g = lock();
    let fixture = fixture();
    let dir = scratch("debuginfod");
    let cache = dir.join("cache");
    // A copy of its own, taken away before `report` runs: as on a machine where the capture is
    // read without the program.
    let program = dir.join("wrappers-stripped");
    std::fs::copy(&fixture.stripped, &program).unwrap();

    // No server: the fixture's own frames have no name.
    let before = dir.join("before");
    std::fs::create_dir_all(&before).unwrap();
    let (before_report, truth_before, said) = record_stripped(&program, &before, &[], &cache);
    let named = truth_sites(&before_report, &truth_before);
    assert!(named.is_empty(), "named without debuginfod: {named:?}");
    assert!(said_about_fixture(&said).is_empty(), "{said}");

    // The server has its debug file: every site of the truth, exact, at its source line.
    let server = Server::start(fixture, &dir);
    let url = server.url();
    let with = dir.join("with");
    std::fs::create_dir_all(&with).unwrap();
    let (report, truth, said) = record_stripped(&program, &with, &["--debuginfod", &url], &cache);
    assert_eq!(truth_sites(&report, &truth), truth, "{said}");
    assert!(said_about_fixture(&said).is_empty(), "{said}");
    // What was named, for whoever runs this with --nocapture.
    let leaves: Vec<String> = by_leaf(&before_report).into_keys().collect();
    eprintln!(
        "without the server, the leaves: {leaves:?}\nthrough {url}, by leaf (bytes, \
         allocations), as the fixture counted them: {:?}",
        truth_sites(&report, &truth)
    );
    let lines: Vec<&str> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["frames"].as_array().unwrap())
        .filter(|f| {
            f["module"]
                .as_str()
                .is_some_and(|m| m.ends_with("wrappers-stripped"))
        })
        .filter_map(|f| f["file"].as_str())
        .collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|f| f.ends_with("wrappers.cpp")),
        "{lines:?}"
    );
    let cached = cache.join(&fixture.build_id).join("debuginfo");
    assert!(cached.is_file(), "{} not cached", cached.display());

    // The server and the program gone, DEBUGINFOD_URLS still naming the server: `report`
    // names the capture from the cache, placing its offsets by the segments it recorded.
    drop(server);
    std::fs::remove_file(&program).unwrap();
    let capture = with.join("r.btcap");
    let capture = capture.to_str().unwrap();
    let again = dir.join("again.json");
    let out = bridge_trace(
        &["report", capture, "-o", again.to_str().unwrap()],
        &cache,
        Some(&url),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(truth_sites(&json(&again), &truth), truth, "{said}");
    assert!(said_about_fixture(&said).is_empty(), "{said}");

    // Neither server nor cache: one line for the module, its frames unnamed, and a report.
    let empty = dir.join("empty-cache");
    let unnamed = dir.join("unnamed.json");
    let out = bridge_trace(
        &["report", capture, "-o", unnamed.to_str().unwrap()],
        &empty,
        Some(&url),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    let about = said_about_fixture(&said);
    assert_eq!(about.len(), 1, "{said}");
    assert!(about[0].contains(&fixture.build_id), "{said}");
    let named = truth_sites(&json(&unnamed), &truth);
    assert!(named.is_empty(), "named with no server: {named:?}");
}

/// A URL that is not one is refused in one line before anything is traced.
#[test]
fn a_bad_server_url_is_refused() {
    let out = Command::new(BIN)
        .args(["report", "none.btcap", "--debuginfod", "localhost:8002"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("'localhost:8002'"), "{said}");
}
