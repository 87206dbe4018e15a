//! The layering of `bridge-trace/src`, checked from the source itself: every `crate::` path
//! in a module points to a module of a lower layer (the order `lib.rs` declares them in), the
//! offline half never reaches into the live half, nothing imports the command line, and no
//! command imports another. Runs without root.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// The top-level modules, lowest layer first, and which half each belongs to.
const LAYERS: &[(&str, Half)] = &[
    ("error", Half::Leaf),
    ("units", Half::Leaf),
    ("os", Half::Leaf),
    ("output", Half::Leaf),
    ("model", Half::Leaf),
    ("target", Half::Live),
    ("attach", Half::Live),
    ("unwind", Half::Live),
    ("collect", Half::Live),
    ("capture", Half::Offline),
    ("symbolize", Half::Offline),
    ("aggregate", Half::Offline),
    ("render", Half::Offline),
    ("cmd", Half::Command),
    ("cli", Half::Cli),
];

/// Commands that read files only: they belong to the offline half too.
const OFFLINE_COMMANDS: &[&str] = &["report", "diff"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Half {
    Leaf,
    Live,
    Offline,
    Command,
    Cli,
}

/// One `crate::` reference: the module it is in, the module it names, and where.
#[derive(Debug)]
struct Edge {
    from: Vec<String>,
    to: Vec<String>,
    at: String,
}

/// A file's module path below the crate root (`cmd/record/mod.rs` → `["cmd", "record"]`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    parts
}

/// Source without comments and string literals (a doc link or a message that says
/// `crate::x` is no import).
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            // A char literal ('"', '\'', 'x'); a lifetime ('a) is left as it is.
            '\'' => {
                let ahead: Vec<char> = chars.clone().take(3).collect();
                let skip = match ahead.as_slice() {
                    ['\\', _, '\'', ..] => 3,
                    [_, '\'', ..] => 2,
                    _ => 0,
                };
                for _ in 0..skip {
                    chars.next();
                }
                out.push('\'');
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    out
}

/// Every module path a file names through `crate::`, including each branch of a
/// `use crate::{a::b, c}` tree.
fn references(code: &str) -> Vec<(Vec<String>, usize)> {
    let mut found = Vec::new();
    let mut rest = code;
    let mut offset = 0;
    while let Some(i) = rest.find("crate::") {
        let start = offset + i;
        let after = &rest[i + "crate::".len()..];
        if after.starts_with('{') {
            let end = matching_brace(after);
            for branch in split_top(&after[1..end]) {
                found.push((path_of(branch), start));
            }
        } else {
            found.push((path_of(after), start));
        }
        offset = start + "crate::".len();
        rest = &code[offset..];
    }
    found
}

fn matching_brace(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// The comma-separated items of a use tree's top level.
fn split_top(s: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    items.into_iter().filter(|i| !i.trim().is_empty()).collect()
}

/// The leading `a::b::c` of a path (module segments only, lower-case names).
fn path_of(s: &str) -> Vec<String> {
    s.trim()
        .split("::")
        .map(|seg| {
            seg.trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .take_while(|seg| seg.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn edges(src: &Path) -> Vec<Edge> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut edges = Vec::new();
    for file in files {
        let from = module_of(src, &file);
        if from.is_empty() || from == ["lib"] || from == ["main"] {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = code_only(&text);
        for (to, at) in references(&code) {
            if to.is_empty() {
                continue;
            }
            let line = code[..at].matches('\n').count() + 1;
            edges.push(Edge {
                from: from.clone(),
                to,
                at: format!("{}:{line}", file.display()),
            });
        }
    }
    edges
}

fn layer(module: &str) -> Option<(usize, Half)> {
    LAYERS
        .iter()
        .position(|(m, _)| *m == module)
        .map(|i| (i, LAYERS[i].1))
}

/// The rules an edge breaks, in words.
fn broken(e: &Edge) -> Option<String> {
    let (from, to) = (&e.from[0], &e.to[0]);
    if from == to {
        // Inside one top-level module: only commands have rules between their parts.
        if from == "cmd" && e.from.len() > 1 && e.to.len() > 1 && e.from[1] != e.to[1] {
            return Some(format!(
                "command `{}` imports command `{}`: what they share belongs in a stage or a leaf",
                e.from[1], e.to[1]
            ));
        }
        return None;
    }
    let Some((from_layer, from_half)) = layer(from) else {
        return Some(format!("`{from}` is not in the layering table"));
    };
    let Some((to_layer, to_half)) = layer(to) else {
        return Some(format!("`{to}` is not in the layering table"));
    };
    if to_half == Half::Cli {
        return Some(format!("`{from}` imports the command line (`cli`)"));
    }
    let offline = from_half == Half::Offline
        || (from_half == Half::Command
            && e.from
                .get(1)
                .is_some_and(|c| OFFLINE_COMMANDS.contains(&c.as_str())));
    if offline && to_half == Half::Live {
        return Some(format!(
            "`{}` is offline but imports `{to}` of the live half",
            e.from.join("::")
        ));
    }
    if to_layer >= from_layer {
        return Some(format!(
            "`{from}` imports `{to}`, which is not below it (layers: {})",
            LAYERS
                .iter()
                .map(|(m, _)| *m)
                .collect::<Vec<_>>()
                .join(" < ")
        ));
    }
    None
}

fn violations(src: &Path) -> Vec<String> {
    edges(src)
        .iter()
        .filter_map(|e| broken(e).map(|why| format!("{}: {why}", e.at)))
        .collect()
}

#[test]
fn imports_point_down_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "{} imports break the layering:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // The table covers every top-level module, and the walk finds edges at all.
    let modules: BTreeSet<String> = edges(&src).into_iter().map(|e| e.from[0].clone()).collect();
    for (m, _) in LAYERS {
        assert!(
            modules.contains(*m) || *m == "error",
            "no import found in `{m}`: is the walk reading the tree?"
        );
    }
}

#[test]
fn a_planted_backward_import_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let write = |rel: &str, text: &str| {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("units.rs", "use crate::error::Result;\n");
    // Each of these breaks one rule.
    write(
        "target/mod.rs",
        "use crate::{error::Error, capture::Capture};\n",
    );
    write("capture.rs", "pub fn f() { crate::collect::snapshot(); }\n");
    write("render/mod.rs", "use crate::cli::Request;\n");
    write(
        "cmd/watch/mod.rs",
        "use crate::{cmd::record::session, model::maps::Mapping};\n",
    );
    write("cmd/diff.rs", "use crate::attach::Tracer;\n");
    // Mentions in comments and strings are not imports.
    write(
        "aggregate.rs",
        "//! see [`crate::cli`]\nconst S: &str = \"crate::cli\";\n",
    );
    let bad = violations(dir.path());
    let said = bad.join("\n");
    assert_eq!(bad.len(), 5, "{said}");
    for expected in [
        "`target` imports `capture`, which is not below it",
        "`capture` is offline but imports `collect` of the live half",
        "`render` imports the command line",
        "command `watch` imports command `record`",
        "`cmd::diff` is offline but imports `attach` of the live half",
    ] {
        assert!(said.contains(expected), "missing {expected:?} in:\n{said}");
    }
}
