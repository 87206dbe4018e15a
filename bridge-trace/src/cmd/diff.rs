//! `bridge-trace diff BEFORE AFTER`: two reports of a service — before and after an update, or
//! an hour apart — compared. Each is folded stacks (`.folded`) or bridge-trace's JSON report.
//! Out: a differential flamegraph (inferno: widths are the bytes AFTER holds, red where a stack
//! holds more than before, blue where less), the differential folded lines (`stack before
//! after`), and the call sites that grew most, as a table.
use std::{collections::BTreeMap, path::Path};

use inferno::flamegraph::{self, color::BasicPalette, Palette};

use crate::{
    aggregate::{report_of, Report},
    capture::{self, Capture},
    error::{Error, Result},
    model::sites::Wrappers,
    output,
    render::folded_lines,
    units::human_bytes,
};

/// Outstanding bytes per folded stack (frames root first, `;`-joined).
pub type Stacks = BTreeMap<String, u64>;

/// Reads a report to compare: bridge-trace's JSON (by extension or a leading `{`), or folded.
pub fn load(path: &Path) -> Result<Stacks> {
    let bad = |reason: String| Error::Input {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if bytes.starts_with(capture::MAGIC) {
        let capture = Capture::read(path)?;
        let report = report_of(&capture, &[], None).report;
        return parse_folded(&folded_lines(&report).join("\n")).map_err(bad);
    }
    let text = String::from_utf8(bytes).map_err(|_| {
        bad("not folded stacks, a JSON report or a raw capture (it is not text)".into())
    })?;
    let json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    if json {
        let report: Report = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a bridge-trace JSON report: {e}")))?;
        return parse_folded(&folded_lines(&report).join("\n")).map_err(bad);
    }
    parse_folded(&text).map_err(bad)
}

/// Folded stacks: `frame;frame;... COUNT` per line (identical stacks add up; blank lines
/// skipped). The error names the first bad line.
pub fn parse_folded(text: &str) -> std::result::Result<Stacks, String> {
    let mut stacks = Stacks::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let parsed = line
            .rsplit_once(' ')
            .filter(|(stack, _)| !stack.trim().is_empty())
            .and_then(|(stack, count)| Some((stack.trim(), count.parse::<u64>().ok()?)));
        let Some((stack, count)) = parsed else {
            let shown: String = line.chars().take(80).collect();
            return Err(format!(
                "line {}: not folded stacks ('frame;frame;... BYTES'): {shown:?}",
                i + 1
            ));
        };
        let total = stacks.entry(stack.to_string()).or_default();
        *total = total.saturating_add(count);
    }
    Ok(stacks)
}

/// One call site (a stack's first frame past the allocation wrappers) in both reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub name: String,
    pub before: u64,
    pub after: u64,
}

impl Site {
    pub fn growth(&self) -> i128 {
        i128::from(self.after) - i128::from(self.before)
    }
}

/// A folded stack's call site: its leaf frame, or the first frame above the allocation
/// wrappers on top of it (folded stacks from other tools keep them).
fn site<'a>(stack: &'a str, wrappers: &Wrappers) -> &'a str {
    let frames: Vec<&str> = stack.split(';').collect();
    let run = wrappers.run(frames.iter().rev().map(|f| Some(*f)));
    frames[frames.len() - 1 - run]
}

/// The wrapper rule, with the wrappers these stacks show.
fn wrappers_of(before: &Stacks, after: &Stacks) -> Wrappers {
    let mut w = Wrappers::default();
    let stacks: Vec<Vec<Option<&str>>> = before
        .keys()
        .chain(after.keys())
        .map(|s| s.rsplit(';').map(Some).collect())
        .collect();
    w.detect(&stacks);
    w
}

/// A folded stack, whole.
fn whole(stack: &str) -> &str {
    stack
}

/// (bytes before, bytes after) per `key` of the stacks of either report.
fn joined<'a>(
    before: &'a Stacks,
    after: &'a Stacks,
    key: impl Fn(&'a str) -> &'a str,
) -> BTreeMap<&'a str, (u64, u64)> {
    let mut both: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (stack, bytes) in before {
        let e = both.entry(key(stack)).or_default();
        e.0 = e.0.saturating_add(*bytes);
    }
    for (stack, bytes) in after {
        let e = both.entry(key(stack)).or_default();
        e.1 = e.1.saturating_add(*bytes);
    }
    both
}

/// Every call site of either report, the most grown first.
pub fn sites(before: &Stacks, after: &Stacks) -> Vec<Site> {
    let wrappers = wrappers_of(before, after);
    let mut sites: Vec<Site> = joined(before, after, |s| site(s, &wrappers))
        .into_iter()
        .map(|(name, (before, after))| Site {
            name: name.to_string(),
            before,
            after,
        })
        .collect();
    sites.sort_by(|a, b| b.growth().cmp(&a.growth()).then(a.name.cmp(&b.name)));
    sites
}

/// `stack BEFORE AFTER` per stack of either report, sorted: inferno's differential input.
pub fn differential_lines(before: &Stacks, after: &Stacks) -> Vec<String> {
    joined(before, after, whole)
        .into_iter()
        .map(|(stack, (b, a))| format!("{stack} {b} {a}"))
        .collect()
}

/// The differential flamegraph.
pub fn svg(before: &Stacks, after: &Stacks, title: &str) -> std::io::Result<Vec<u8>> {
    let mut opts = flamegraph::Options::default();
    opts.title = title.to_string();
    let (b, a): (u64, u64) = (before.values().sum(), after.values().sum());
    opts.subtitle = Some(format!(
        "{} before, {} after; red: holds more than before, blue: less; widths: bytes after",
        human_bytes(b),
        human_bytes(a)
    ));
    opts.count_name = "bytes".into();
    opts.colors = Palette::Basic(BasicPalette::Mem);
    opts.deterministic = true;
    let mut lines = differential_lines(before, after);
    if after.values().all(|&v| v == 0) {
        // inferno draws nothing of zero width; say so with one frame.
        lines = vec!["[nothing outstanding after] 0 1".to_string()];
    }
    let mut out = Vec::new();
    flamegraph::from_lines(&mut opts, lines.iter().map(|s| s.as_str()), &mut out)
        .map_err(std::io::Error::other)?;
    Ok(out)
}

/// What a diff output is, from its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffFormat {
    Svg,
    Folded,
    Text,
}

impl DiffFormat {
    pub fn from_path(path: &Path) -> Option<DiffFormat> {
        match path.extension()?.to_str()? {
            "svg" => Some(DiffFormat::Svg),
            "folded" => Some(DiffFormat::Folded),
            "txt" => Some(DiffFormat::Text),
            _ => None,
        }
    }
}

/// A validated `bridge-trace diff` request.
#[derive(Clone, Debug)]
pub struct DiffConfig {
    pub before: std::path::PathBuf,
    pub after: std::path::PathBuf,
    pub outputs: Vec<(std::path::PathBuf, DiffFormat)>,
    pub top: usize,
    pub mode: u32,
}

/// Compares the two reports, writes every output, and returns the table of sites (for stdout).
pub fn run(config: &DiffConfig) -> Result<String> {
    let before = load(&config.before)?;
    let after = load(&config.after)?;
    let sites = sites(&before, &after);
    let table = table(&sites, config.top);
    let title = format!(
        "bridge-trace diff: {} → {}",
        config.before.display(),
        config.after.display()
    );
    // Everything rendered first: a failure leaves no partial set behind.
    let mut rendered = Vec::new();
    for (path, format) in &config.outputs {
        let bytes = match format {
            DiffFormat::Svg => svg(&before, &after, &title)
                .map_err(|e| Error::io("rendering the differential flamegraph", e))?,
            DiffFormat::Folded => {
                let mut text = differential_lines(&before, &after).join("\n");
                text.push('\n');
                text.into_bytes()
            }
            DiffFormat::Text => table.clone().into_bytes(),
        };
        rendered.push((path.clone(), bytes));
    }
    output::write_all(&rendered, config.mode)?;
    Ok(table)
}

/// The `top` most grown sites (and every site that shrank last), as text.
pub fn table(sites: &[Site], top: usize) -> String {
    let mut out = format!(
        "{:>14} {:>14} {:>14}  call site\n",
        "growth", "before", "after"
    );
    for s in sites.iter().take(top) {
        let growth = s.growth();
        let sign = if growth > 0 { "+" } else { "" };
        out.push_str(&format!(
            "{:>14} {:>14} {:>14}  {}\n",
            format!("{sign}{growth}"),
            s.before,
            s.after,
            s.name
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stacks(text: &str) -> Stacks {
        parse_folded(text).unwrap()
    }

    #[test]
    fn folded_lines_add_up_and_bad_ones_are_named() {
        let s = stacks("main;a;leak 100\n\nmain;a;leak 20\nmain;b 5\n");
        assert_eq!(s["main;a;leak"], 120);
        assert_eq!(s.len(), 2);
        for bad in ["main;a", "main;a x", " 12", "main;a -3"] {
            let e = parse_folded(&format!("ok 1\n{bad}\n")).unwrap_err();
            assert!(e.starts_with("line 2:"), "{bad}: {e}");
        }
    }

    #[test]
    fn sites_are_ranked_by_growth() {
        let before = stacks("main;cache 1000\nmain;handle;reject 100\nmain;gone 50\n");
        let after = stacks("main;cache 1000\nmain;handle;reject 5000\nmain;new 70\n");
        let s = sites(&before, &after);
        let names: Vec<_> = s.iter().map(|s| (s.name.as_str(), s.growth())).collect();
        assert_eq!(
            names,
            [("reject", 4900), ("new", 70), ("cache", 0), ("gone", -50)]
        );
        let lines = differential_lines(&before, &after);
        assert!(lines.contains(&"main;gone 50 0".to_string()), "{lines:?}");
        assert!(lines.contains(&"main;new 0 70".to_string()), "{lines:?}");
        let table = table(&s, 2);
        assert!(
            table.contains("+4900") && table.contains("reject"),
            "{table}"
        );
        assert!(!table.contains("gone"), "{table}");
    }

    /// Folded stacks of other tools keep the wrappers: the site is the frame past them, and
    /// one wrapper's callers stay apart.
    #[test]
    fn sites_skip_allocation_wrappers() {
        let before = stacks(
            "main;load;xmalloc 10
",
        );
        let after = stacks(
            "main;load;xmalloc 30
main;parse;xstrdup;xmalloc 20
\
             main;build;operator new(unsigned long) 5
main;a;my_alloc 1
main;b;my_alloc 2
",
        );
        let s = sites(&before, &after);
        let names: Vec<_> = s.iter().map(|s| (s.name.as_str(), s.growth())).collect();
        assert_eq!(
            names,
            [
                ("load", 20),
                ("parse", 20),
                ("build", 5),
                ("b", 2),
                ("a", 1)
            ]
        );
    }
}
