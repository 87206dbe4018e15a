//! Suppressions against a program that knows what it leaked (tests/fixtures/suppress.c): a
//! file in LeakSanitizer's format takes out the stacks it names by function and by library,
//! `--suppress-declared` the ones the program names itself (`__lsan_default_suppressions`,
//! read from its executable); each rule's bytes and counts are said, exact; what is not
//! suppressed stays exact; the runtime's one-time allocations (a thread's TLS, stdout's
//! buffer) are marked, not hidden; a bad file is one line and no output.
use std::{path::PathBuf, process::Command, sync::OnceLock};

mod common;
use common::*;

/// The fixture and the library it links, built once.
fn fixture() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = std::path::Path::new(TMP).join("suppress");
        std::fs::create_dir_all(&dir).unwrap();
        let src = repo().join("tests/fixtures");
        let lib = dir.join("libleaky_shared.so");
        let s = |f: &str| src.join(f).to_str().unwrap().to_string();
        gcc(&[
            "-g",
            "-shared",
            "-fPIC",
            "-o",
            lib.to_str().unwrap(),
            &s("libleaky_shared.c"),
        ]);
        let bin = dir.join("suppress");
        gcc(&[
            "-g",
            "-fno-omit-frame-pointer",
            "-pthread",
            "-o",
            bin.to_str().unwrap(),
            &s("suppress.c"),
            &format!("-L{}", dir.display()),
            "-lleaky_shared",
            "-Wl,-rpath,$ORIGIN",
        ]);
        bin
    })
}

fn report(args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("report").args(args).output().unwrap()
}

#[test]
fn suppressed_by_function_library_and_declaration_each_said_exactly() {
    let _g = lock();
    let dir = scratch("suppress");
    let truth_path = dir.join("truth.txt");
    let json_path = dir.join("all.json");
    let out = record(&[
        "-o",
        json_path.to_str().unwrap(),
        "--",
        fixture().to_str().unwrap(),
        truth_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let truth = truth(&truth_path);
    let all = json(&json_path);
    let held = by_leaf(&all);
    for (site, want) in &truth {
        assert_eq!(
            held.get(site),
            Some(want),
            "{site} before suppression: {held:?}"
        );
    }
    assert_eq!(
        all["meta"]["declared_suppressions"], "leak:declared_leak\n",
        "{:#}",
        all["meta"]
    );
    // The runtime's own: marked, and still there.
    let runtime: Vec<&str> = all["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["runtime"].as_str())
        .collect();
    assert!(
        runtime.iter().any(|r| r.contains("thread-local storage")),
        "{runtime:?}"
    );
    assert!(runtime.iter().any(|r| r.contains("stdio")), "{runtime:?}");

    // Suppressed again from the capture: by function, by library, by declaration.
    let rules = dir.join("sup.txt");
    std::fs::write(
        &rules,
        "# vendor code we cannot fix\nleak:libleaky_shared.so\nleak:^leak_known$\nrace:other\n",
    )
    .unwrap();
    let capture = json_path.with_extension("btcap");
    let (json_out, text_out) = (dir.join("sup.json"), dir.join("sup.txt.out"));
    let out = report(&[
        capture.to_str().unwrap(),
        "--suppress",
        rules.to_str().unwrap(),
        "--suppress-declared",
        "-o",
        json_out.to_str().unwrap(),
        "-f",
        "json",
    ]);
    assert_ok(&out);
    let sup = json(&json_out);
    let held = by_leaf(&sup);
    assert_eq!(held.get("leak_mine"), truth.get("leak_mine"), "{held:?}");
    for gone in ["leak_known", "declared_leak", "shared_leak"] {
        assert!(!held.contains_key(gone), "{gone} still reported: {held:?}");
    }
    let said: Vec<(String, String, u64, u64)> = sup["suppressed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["rule"].as_str().unwrap().to_string(),
                s["source"].as_str().unwrap().to_string(),
                s["bytes"].as_u64().unwrap(),
                s["count"].as_u64().unwrap(),
            )
        })
        .collect();
    let rules_src = rules.display().to_string();
    let t = |site: &str| truth[site];
    assert_eq!(
        said,
        [
            (
                "leak:libleaky_shared.so".to_string(),
                rules_src.clone(),
                t("shared_leak").0,
                t("shared_leak").1
            ),
            (
                "leak:^leak_known$".into(),
                rules_src,
                t("leak_known").0,
                t("leak_known").1
            ),
            (
                "leak:declared_leak".into(),
                "the program's __lsan_default_suppressions".into(),
                t("declared_leak").0,
                t("declared_leak").1
            ),
        ]
    );
    let out = report(&[
        capture.to_str().unwrap(),
        "--suppress",
        rules.to_str().unwrap(),
        "-o",
        text_out.to_str().unwrap(),
        "-f",
        "text",
    ]);
    assert_ok(&out);
    let text = std::fs::read_to_string(&text_out).unwrap();
    assert!(
        text.contains(&format!(
            "note: suppressed by leak:^leak_known$ (from {}): {} bytes",
            rules.display(),
            t("leak_known").0
        )),
        "{text}"
    );
    assert!(text.contains("[runtime: "), "{text}");
    // Without --suppress-declared the program's own leak stays.
    assert!(text.contains("declared_leak"), "{text}");

    // A file that is not one: one line, non-zero, nothing written.
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "leak:fine\nthis is not a rule\n").unwrap();
    let never = dir.join("never.json");
    let out = report(&[
        capture.to_str().unwrap(),
        "--suppress",
        bad.to_str().unwrap(),
        "-o",
        never.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(!never.exists());
}
