//! The otel_memory USDT contract, from both ends. The consumer: a program that carries the
//! probes itself (tests/fixtures/usdt_contract.c, written with <sys/sdt.h>, not with our
//! sampler) is traced through them exactly, every event it fires accounted once, and its
//! semaphores are zero whenever no tracer is attached, also after a SIGKILL of the tracer. The
//! producer: bridge-trace's preloadable sampler estimates the demo's leak from its weights,
//! and a program sees the same allocator with it as without it, under glibc and jemalloc. A
//! library carrying the contract that a traced process dlopens later is picked up.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

mod common;
use common::*;

/// The interop fixture built at `opt` (frame pointers kept: the report's stacks are checked).
fn usdt_contract(opt: &str) -> PathBuf {
    let dir = Path::new(TMP).join("usdt");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("usdt_contract{opt}"));
    build_c(&out, "tests/fixtures/usdt_contract.c", &[opt]);
    out
}

/// The fixture's truth file, split: its leaking sites, and its counts (what it fired, what its
/// semaphores held at the end).
fn split_truth(path: &Path) -> (Sites, BTreeMap<String, u64>) {
    let mut sites = truth(path);
    let mut counts = BTreeMap::new();
    for key in [
        "fired_allocs",
        "fired_frees",
        "alloc_semaphore",
        "free_semaphore",
    ] {
        let (n, _) = sites.remove(key).unwrap_or_else(|| panic!("no {key}"));
        counts.insert(key.to_string(), n);
    }
    (sites, counts)
}

/// `record -- usdt_contract run` at -O0 and at -O2: traced through the program's own probes
/// (tier usdt, no uprobe on the allocator), the report holds exactly what the program says it
/// leaked, at the callers of its allocation wrapper, and every event it fired is counted once.
/// Run untraced, it fires none.
#[test]
fn the_contract_of_another_producer_is_consumed_exactly() {
    let _g = lock();
    for opt in ["-O0", "-O2"] {
        let exe = usdt_contract(opt);
        let dir = scratch(&format!("usdt-exact{opt}"));

        let untraced = dir.join("untraced.truth");
        let status = Command::new(&exe)
            .args(["run", "3000"])
            .arg(&untraced)
            .status()
            .unwrap();
        assert!(status.success());
        let (_, counts) = split_truth(&untraced);
        assert_eq!(counts["fired_allocs"], 0, "{opt}: fired with no tracer");
        assert_eq!(counts["fired_frees"], 0, "{opt}: fired with no tracer");
        assert_eq!(counts["alloc_semaphore"], 0, "{opt}");

        let traced = dir.join("traced.truth");
        let report = dir.join("report.json");
        let out = Command::new(BIN)
            .args(["record", "-o", report.to_str().unwrap(), "--"])
            .arg(&exe)
            .args(["run", "3000"])
            .arg(&traced)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_ok(&out);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = exe.file_name().unwrap().to_string_lossy();
        assert!(
            stderr.contains(&format!(
                "through the otel_memory probes of {name} (2 sites)"
            )),
            "{opt}: {stderr}"
        );
        let (sites, counts) = split_truth(&traced);
        assert_eq!(counts["alloc_semaphore"], 1, "{opt}: raised while traced");
        assert_eq!(counts["free_semaphore"], 1, "{opt}: raised while traced");
        // 3000 rounds: 3000 + 1000 leaks and 4 × 3000 churned blocks.
        assert_eq!(counts["fired_allocs"], 16_000, "{opt}");
        assert_eq!(counts["fired_frees"], 12_000, "{opt}");

        let r = json(&report);
        let meta = &r["meta"];
        assert_eq!(meta["tier"], "usdt", "{opt}");
        let c = &meta["counters"];
        assert_eq!(c["usdt_allocs"], counts["fired_allocs"], "{opt}: {c}");
        assert_eq!(c["allocs"], counts["fired_allocs"], "{opt}: {c}");
        assert_eq!(c["frees"], counts["fired_frees"], "{opt}: {c}");
        assert_eq!(c["usdt_unknown_frees"], 0, "{opt}: {c}");
        assert_eq!(c["map_full_drops"], 0, "{opt}: {c}");
        // The site of a sample is the caller of the function that fired the probe, as the
        // caller of malloc is for a uprobe on malloc: weight = size here, so the totals are
        // exact.
        assert_eq!(
            by_leaf(&r),
            sites,
            "{opt}: report against the program's truth"
        );
        // And what each site allocated, freed or not: the weights summed, exact here too.
        let allocated = truth(&dir.join("traced.truth.alloc"));
        assert_eq!(
            allocated_by_leaf(&r),
            allocated,
            "{opt}: allocation profile against the program's truth"
        );
        for s in r["stacks"].as_array().unwrap() {
            let frames = functions(s);
            assert!(frames.contains(&"main"), "{opt}: broken stack {frames:?}");
        }
    }
}

/// The `serve` fixture: started, its pid said on its first line.
struct Served {
    child: KillOnDrop,
    out: BufReader<ChildStdout>,
}

/// What the serving fixture says of itself on SIGUSR1: its semaphores and what it fired.
#[derive(Debug, Clone, Copy, PartialEq)]
struct State {
    alloc_semaphore: u64,
    free_semaphore: u64,
    fired_allocs: u64,
    fired_frees: u64,
}

impl Served {
    fn start(exe: &Path, truth: &Path) -> Served {
        let (child, out, line) = spawn_reading(Command::new(exe).arg("serve").arg(truth));
        assert!(line.starts_with("ready "), "{line:?}");
        Served { child, out }
    }

    fn pid(&self) -> String {
        self.child.0.id().to_string()
    }

    fn state(&mut self) -> State {
        signal(&self.child.0, libc::SIGUSR1);
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let f: Vec<u64> = line
            .trim()
            .strip_prefix("truth ")
            .unwrap_or_else(|| panic!("{line:?}"))
            .split(' ')
            .map(|n| n.parse().unwrap())
            .collect();
        State {
            alloc_semaphore: f[0],
            free_semaphore: f[1],
            fired_allocs: f[2],
            fired_frees: f[3],
        }
    }

    /// Polls its state until `until` holds (a minute at most).
    fn wait_for(&mut self, what: &str, until: impl Fn(&State) -> bool) -> State {
        let started = Instant::now();
        loop {
            let s = self.state();
            if until(&s) {
                return s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{what}: still {s:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running program with the contract: nothing fires before a tracer comes; `watch` raises
/// the semaphores and its samples arrive; after `watch` is SIGKILLed the kernel drops them (the
/// uprobe links' reference counters close with its descriptors) and nothing fires; a `record
/// --pid` then counts exactly the events fired while it was attached, and leaves the
/// semaphores at zero when it exits.
#[test]
fn semaphores_are_raised_only_while_traced() {
    let _g = lock();
    let dir = scratch("usdt-semaphores");
    let mut served = Served::start(&usdt_contract("-O2"), &dir.join("serve.truth"));
    let idle = served.state();
    assert_eq!(
        idle,
        State {
            alloc_semaphore: 0,
            free_semaphore: 0,
            fired_allocs: 0,
            fired_frees: 0
        }
    );

    let mut watch = Command::new(BIN)
        .args(["watch", "--pid", &served.pid(), "--interval", "1s"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    while !said.contains("watching") {
        said.clear();
        assert!(stderr.read_line(&mut said).unwrap() > 0, "watch ended");
    }
    assert!(said.contains("[tier usdt]"), "{said}");
    served.wait_for("attached", |s| {
        s.alloc_semaphore == 1 && s.free_semaphore == 1 && s.fired_allocs > 0
    });
    watch.kill().unwrap();
    watch.wait().unwrap();
    let after_kill = served.wait_for("semaphores after SIGKILL", |s| {
        s.alloc_semaphore == 0 && s.free_semaphore == 0
    });
    // Nothing fires any more: the counts stay where they were, rounds later.
    std::thread::sleep(Duration::from_millis(200));
    let later = served.state();
    assert_eq!(later, after_kill, "fired with no tracer attached");

    // `record --pid` until the program exits: every event fired from its attach on.
    let report = dir.join("record.json");
    let (tracer, _stderr) = start_tracer(&["--pid", &served.pid(), "-o", report.to_str().unwrap()]);
    let tracer = KillOnDrop(tracer);
    served.wait_for("record attached", |s| {
        s.alloc_semaphore == 1 && s.fired_allocs > later.fired_allocs
    });
    signal(&served.child.0, libc::SIGTERM);
    assert!(served.child.0.wait().unwrap().success());
    let mut tracer = tracer;
    assert!(tracer.0.wait().unwrap().success(), "record failed");
    let (_, done) = split_truth(&dir.join("serve.truth"));
    let r = json(&report);
    assert_eq!(r["meta"]["tier"], "usdt");
    let c = &r["meta"]["counters"];
    let fired = done["fired_allocs"] - later.fired_allocs;
    let seen = c["usdt_allocs"].as_u64().unwrap();
    eprintln!("record --pid: fired {fired} allocations, seen {seen}: {c}");
    // A thread between its semaphore check and the site as the probe goes in fires an event
    // the tracer cannot see: one at most, at the attach.
    assert!(
        seen <= fired && fired - seen <= 1,
        "fired {fired}, seen {seen}: {c}"
    );
    // Every free fired is either of a block allocated while attached, or of one allocated
    // before the alloc probe was (the free probe goes first, so that no block freed meanwhile
    // is taken for a leak): each counted once.
    let freed = c["frees"].as_u64().unwrap() + c["usdt_unknown_frees"].as_u64().unwrap();
    let fired_frees = done["fired_frees"] - later.fired_frees;
    assert!(
        freed <= fired_frees && fired_frees - freed <= 1,
        "fired {fired_frees} frees, seen {freed}: {c}"
    );
}

/// A process traced at tier usdt (the sampler preloaded) that dlopens a library carrying its
/// own probes after `watch` attached: `watch` sees the new mapping, attaches the library's
/// probes too (its semaphores rise and its events fire) and says so.
#[test]
fn a_carrier_dlopened_later_is_picked_up() {
    let _g = lock();
    let dir = scratch("usdt-dlopen");
    let lib = dir.join("libcontract.so");
    let host = dir.join("dlopen_host");
    build_c(
        &lib,
        "tests/fixtures/usdt_contract.c",
        &["-O2", "-fPIC", "-shared", "-DCONTRACT_LIBRARY"],
    );
    build_c(&host, "tests/fixtures/dlopen_host.c", &["-O1"]);
    let (mut child, mut out, mut line) = spawn_reading(
        Command::new(&host)
            .arg(&lib)
            .arg("serve")
            .arg(dir.join("serve.truth"))
            .env("LD_PRELOAD", sampler_lib())
            .stdin(Stdio::piped()),
    );
    assert_eq!(line.trim(), "ready");
    let pid = child.0.id().to_string();

    let said = dir.join("watch.stderr");
    let _watch = KillOnDrop(
        Command::new(BIN)
            .args(["watch", "--pid", &pid, "--interval", "1s"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&said).unwrap())
            .spawn()
            .unwrap(),
    );
    let stderr = || std::fs::read_to_string(&said).unwrap_or_default();
    let started = Instant::now();
    let wait = |what: &str, done: &dyn Fn(&str) -> bool| {
        while !done(&stderr()) {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "{what}:\n{}",
                stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("watching at tier usdt", &|s| {
        s.contains("libbridge_trace_sampler.so") && s.contains("[tier usdt]")
    });
    // Now the host loads the library and runs it.
    use std::io::Write as _;
    writeln!(child.0.stdin.as_mut().unwrap(), "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready "), "{line:?}");
    wait("the library's probes picked up", &|s| {
        s.contains(&format!(
            "pid {pid} mapped the otel_memory probes of libcontract.so (2 sites)"
        ))
    });
    let mut served = Served { child, out };
    let state = served.wait_for("its semaphores raised", |s| {
        s.alloc_semaphore == 1 && s.free_semaphore == 1 && s.fired_allocs > 0
    });
    assert!(state.fired_frees > 0, "{state:?}");
}

/// `watch --sampler -- CMD`: the program is started with the sampler preloaded and watched
/// through its probes; it keeps running when the watch ends (--duration).
#[test]
fn watch_starts_a_program_with_the_sampler() {
    let _g = lock();
    let dir = scratch("usdt-watch-launch");
    let patterns = dir.join("patterns");
    build_c(&patterns, "tests/fixtures/patterns.c", &["-O1"]);
    // Its stderr to a file: the program inherits it, and outlives the watch.
    let said = dir.join("watch.stderr");
    let status = Command::new(BIN)
        .args(["watch", "--sampler", "--interval", "1s", "--duration", "3s"])
        .args(["--metrics-addr", "127.0.0.1:0", "--"])
        .arg(&patterns)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&said).unwrap())
        .status()
        .unwrap();
    let stderr = std::fs::read_to_string(&said).unwrap();
    // The program's pid, from the start line, so that it is stopped whatever happens next.
    let pid: Option<i32> = stderr
        .split("watching patterns (pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next()?.parse().ok());
    let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
    if let Some(p) = pid {
        // SAFETY: plain syscall.
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("through the otel_memory probes of libbridge_trace_sampler.so")
            && stderr.contains("[tier usdt]"),
        "{stderr}"
    );
    assert!(alive, "the program ended with the watch: {stderr}");
}

/// `record --sampler -- data-bridge`: the demo run with the sampler preloaded (one sample in
/// about every 4 KiB), traced through its probes; the leak's estimate is within 25 % of the
/// demo's own count, and the sampler's frames are not in the stacks.
#[test]
fn sampler_estimates_the_demo_leak() {
    let _g = lock();
    let dir = scratch("usdt-demo");
    let demo = dir.join("data-bridge");
    build_c(&demo, "demo/data-bridge.c", &["-O1", "-pthread"]);
    let truth_file = dir.join("truth");
    let report = dir.join("report.json");
    let out = Command::new(BIN)
        .args(["record", "--sampler", "-o", report.to_str().unwrap(), "--"])
        .arg(&demo)
        .args(["--messages", "40000", "--rate", "0", "--truth"])
        .arg(&truth_file)
        .env("BRIDGE_TRACE_SAMPLE_INTERVAL", "4096")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("libbridge_trace_sampler.so") && stderr.contains("sampler preloaded"),
        "{stderr}"
    );
    let truth = truth(&truth_file);
    let r = json(&report);
    assert_eq!(r["meta"]["tier"], "usdt");
    let got = by_leaf(&r);
    for (site, &(bytes, _)) in &truth {
        let estimate = got.get(site).map_or(0, |e| e.0) as f64;
        eprintln!("{site}: estimated {estimate} bytes, truth {bytes}");
        assert!(
            (estimate - bytes as f64).abs() < 0.25 * bytes as f64,
            "{site}: estimated {estimate}, truth {bytes}\n{got:#?}"
        );
    }
    for s in r["stacks"].as_array().unwrap() {
        for f in s["frames"].as_array().unwrap() {
            let module = f["module"].as_str().unwrap_or("");
            assert!(
                !module.contains("libbridge_trace_sampler"),
                "a sampler frame in a stack: {s}"
            );
        }
    }
    let c = &r["meta"]["counters"];
    assert_eq!(c["usdt_unknown_frees"], 0, "{c}");
}

/// The fixture's output with the usable size of each block grown by realloc checked (at least
/// `2 × size + 1`, as asked) and left out.
fn grown_anywhere(out: &str) -> String {
    out.lines()
        .map(|l| match l.split(' ').collect::<Vec<_>>()[..] {
            ["realloc", size, "kept", kept, "usable", usable] => {
                let (size, usable): (u64, u64) = (size.parse().unwrap(), usable.parse().unwrap());
                assert!(usable > 2 * size, "{l}");
                format!("realloc {size} kept {kept}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect()
}

/// What a program observes of its allocator (usable sizes, contents kept by realloc, zeroed
/// calloc, alignments, reallocarray's overflow, frees by another thread and by a forked child)
/// is the same with the sampler preloaded and sampling every allocation, traced, as without
/// it; under glibc's malloc and under jemalloc, linked and preloaded; with the sampled blocks
/// left where the allocator put them (as at short intervals) and moved to a mark (as at the
/// default). Every sampled block freed is recognised as one. Moved, one thing may differ, as
/// the sampler's docs say: the heap is laid out otherwise, so a block glibc grew in place may
/// be grown elsewhere, with another usable size (still at least what was asked for).
#[test]
fn the_sampler_changes_nothing_a_program_sees() {
    let _g = lock();
    let dir = scratch("usdt-abi");
    let source = "tests/fixtures/sampler_abi.c";
    let glibc = dir.join("abi");
    let linked = dir.join("abi-jemalloc");
    build_c(&glibc, source, &["-O1", "-pthread"]);
    build_c(&linked, source, &["-O1", "-pthread", "-ljemalloc"]);
    let dynamic = Command::new("readelf")
        .arg("-d")
        .arg(&linked)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&dynamic.stdout).contains("libjemalloc"),
        "not linked with jemalloc"
    );
    let jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    let runs: [(&str, &Path, Option<&str>); 3] = [
        ("glibc", &glibc, None),
        ("jemalloc linked", &linked, None),
        ("jemalloc preloaded", &glibc, Some(jemalloc)),
    ];
    for ((what, exe, preload), moves) in runs.iter().flat_map(|r| [(*r, "0"), (*r, "1")]) {
        let plain = dir.join(format!("{what}.plain"));
        let mut cmd = Command::new(exe);
        cmd.arg(&plain);
        if let Some(lib) = preload {
            cmd.env("LD_PRELOAD", lib);
        }
        assert!(cmd.status().unwrap().success(), "{what}");

        let what = format!("{what}, moved {moves}");
        let sampled = dir.join(format!("{what}.sampled"));
        let report = dir.join(format!("{what}.json"));
        let mut cmd = Command::new(BIN);
        cmd.args([
            "record",
            "--quiet",
            "--sampler",
            "-o",
            report.to_str().unwrap(),
            "--",
        ])
        .arg(exe)
        .arg(&sampled)
        .env("BRIDGE_TRACE_SAMPLE_INTERVAL", "1")
        .env("BRIDGE_TRACE_SAMPLE_MOVE", moves)
        .stdin(Stdio::null());
        if let Some(lib) = preload {
            cmd.env("LD_PRELOAD", lib);
        }
        let out = cmd.output().unwrap();
        assert_ok(&out);
        let want = std::fs::read_to_string(&plain).unwrap();
        let got = std::fs::read_to_string(&sampled).unwrap();
        assert!(want.lines().count() > 40, "{what}: {want}");
        let (got, want) = if moves == "1" {
            (grown_anywhere(&got), grown_anywhere(&want))
        } else {
            (got, want)
        };
        assert_eq!(got, want, "{what}: the program saw a different allocator");
        let c = &json(&report)["meta"]["counters"];
        assert!(c["usdt_allocs"].as_u64().unwrap() > 2000, "{what}: {c}");
        assert_eq!(c["usdt_unknown_frees"], 0, "{what}: {c}");
    }
}
