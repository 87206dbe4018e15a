//! What an operator deploys, checked by the tools that will read it: the systemd unit by
//! `systemd-analyze verify` (in a root of its own holding the binary where the unit expects it),
//! the Prometheus alert rules by `promtool test rules` and the scrape configuration by
//! `promtool check config`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_bridge-trace");
const TMP: &str = env!("CARGO_TARGET_TMPDIR");

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs `cmd` and fails with what it printed unless it succeeds and prints nothing on stderr.
fn quietly_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{cmd:?}: {}\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

#[test]
fn the_service_unit_verifies() {
    let root = Path::new(TMP).join("unit-root");
    let _ = std::fs::remove_dir_all(&root);
    let units = root.join("etc/systemd/system");
    for d in ["usr/local/bin", "usr/sbin", "usr/lib/systemd"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::create_dir_all(&units).unwrap();
    std::fs::copy(
        deploy().join("systemd/bridge-trace@.service"),
        units.join("bridge-trace@.service"),
    )
    .unwrap();
    // What the unit runs, where it runs it from, and the system's own units it orders after.
    std::fs::copy(BIN, root.join("usr/local/bin/bridge-trace")).unwrap();
    std::fs::copy("/usr/sbin/sysctl", root.join("usr/sbin/sysctl")).unwrap();
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(copied.success());
    quietly_ok(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg("bridge-trace@data-bridge.service"),
    );
    // The capabilities it keeps are the four tracing needs, granted to its dynamic user.
    let unit = std::fs::read_to_string(units.join("bridge-trace@.service")).unwrap();
    let caps = "CAP_BPF CAP_PERFMON CAP_SYS_PTRACE CAP_DAC_READ_SEARCH";
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        assert!(unit.contains(&format!("\n{key}={caps}\n")), "{key}");
    }
    // And what it runs is a command line bridge-trace accepts.
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/bridge-trace "))
        .unwrap();
    assert!(
        exec.starts_with("watch --cgroup system.slice/%i.service "),
        "{exec}"
    );
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let dir = deploy().join("prometheus");
    let out = quietly_ok(Command::new("promtool").current_dir(&dir).args([
        "test",
        "rules",
        "bridge-trace.rules.test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
    let out = quietly_ok(Command::new("promtool").current_dir(&dir).args([
        "check",
        "config",
        "prometheus.yml",
    ]));
    assert!(out.contains("7 rules found"), "{out}");
}
