//! Suppressions, opt-in: LeakSanitizer's (and heaptrack's) `leak:PATTERN` lines, from a file
//! (`--suppress FILE`) or from what the program declares itself
//! (`__lsan_default_suppressions`, `--suppress-declared`), take the held stacks they match out
//! of the report: counted and said per rule, never dropped silently. And, always: the
//! one-time allocations of the runtime (the loader's per-thread TLS, stdio's buffers,
//! libstdc++'s emergency exception pool) are marked as such, not hidden.
use serde::{Deserialize, Serialize};

use super::{Report, StackReport};
use crate::symbolize::Frame;

/// One `leak:` rule and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub source: String,
}

/// The rules of one or more suppression files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suppressions {
    pub rules: Vec<Rule>,
}

/// What one rule took out of a report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Suppressed {
    /// `leak:PATTERN`, as written.
    pub rule: String,
    /// The file, or the program's declaration.
    pub source: String,
    pub bytes: u64,
    pub count: u64,
    pub stacks: u64,
}

impl Suppressions {
    /// Reads LSan's format: one `TYPE:PATTERN` per line, `#` comments and blank lines
    /// skipped. Only `leak:` rules apply to a leak report; other types (a file shared with
    /// ThreadSanitizer, say) are skipped. A line that is no rule is an error naming it.
    pub fn parse(&mut self, text: &str, source: &str) -> Result<(), String> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((kind, pattern)) = line.split_once(':') else {
                return Err(format!(
                    "{source}, line {}: `{line}` is not a suppression (TYPE:PATTERN, as \
                     leak:my_function)",
                    n + 1
                ));
            };
            let pattern = pattern.trim();
            if kind.trim() != "leak" {
                continue;
            }
            if pattern.is_empty() {
                return Err(format!("{source}, line {}: `leak:` with no pattern", n + 1));
            }
            self.rules.push(Rule {
                pattern: pattern.to_string(),
                source: source.to_string(),
            });
        }
        Ok(())
    }

    /// The first rule that matches a frame of `frames` (its function, source file or module).
    fn rule_for(&self, frames: &[&Frame]) -> Option<usize> {
        self.rules.iter().position(|r| {
            frames.iter().any(|f| {
                [
                    f.function.as_deref(),
                    f.file.as_deref(),
                    f.module.as_deref(),
                ]
                .into_iter()
                .flatten()
                .any(|name| matches(&r.pattern, name))
            })
        })
    }

    /// Takes the stacks a rule matches out of `report`'s held ones, and says what each rule
    /// took in `report.suppressed`.
    pub fn apply(&self, report: &mut Report) {
        if self.rules.is_empty() {
            return;
        }
        let mut taken: Vec<Suppressed> = self
            .rules
            .iter()
            .map(|r| Suppressed {
                rule: format!("leak:{}", r.pattern),
                source: r.source.clone(),
                ..Suppressed::default()
            })
            .collect();
        report.stacks.retain(|s| {
            let frames: Vec<&Frame> = s.frames.iter().chain(&s.wrappers).collect();
            match self.rule_for(&frames) {
                Some(i) => {
                    taken[i].bytes += s.bytes;
                    taken[i].count += s.count;
                    taken[i].stacks += 1;
                    false
                }
                None => true,
            }
        });
        report.suppressed = taken;
    }
}

/// Applies `files`' rules and, with `declared`, those the program declared (in the report's
/// metadata, read when it was recorded).
pub fn apply_all(report: &mut Report, files: &Suppressions, declared: bool) -> Result<(), String> {
    let mut all = files.clone();
    if declared {
        if let Some(text) = report.meta.declared_suppressions.clone() {
            all.parse(&text, "the program's __lsan_default_suppressions")?;
        }
    }
    all.apply(report);
    Ok(())
}

/// LSan's pattern match: `*` is any run of characters, a leading `^` and a trailing `$`
/// anchor the match at the ends; otherwise the pattern may match anywhere in `name`.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, start) = match pattern.strip_prefix('^') {
        Some(p) => (p, ""),
        None => (pattern, "*"),
    };
    let (p, end) = match p.strip_suffix('$') {
        Some(p) => (p, ""),
        None => (p, "*"),
    };
    glob(format!("{start}{p}{end}").as_bytes(), name.as_bytes())
}

/// `*`-only glob over the whole of `text` (the classic backtracking to the last star).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Well-known one-time allocations of the runtime: a frame's function, and what it allocates.
const RUNTIME: &[(&str, &str)] = &[
    (
        "_dl_allocate_tls",
        "the loader's thread-local storage (once per thread)",
    ),
    (
        "allocate_dtv",
        "the loader's thread-local storage (once per thread)",
    ),
    (
        "_dl_resize_dtv",
        "the loader's thread-local storage (once per thread)",
    ),
    (
        "_dl_new_object",
        "the loader's record of a loaded object (once per object)",
    ),
    (
        "_IO_file_doallocate",
        "a stdio stream's buffer (once per stream)",
    ),
    (
        "(anonymous namespace)::pool::pool",
        "libstdc++'s emergency exception pool (once)",
    ),
    (
        "__gnu_cxx::__freeres",
        "libstdc++'s emergency exception pool (once)",
    ),
];

/// What a stack allocates, if it is one of the runtime's one-time allocations.
pub fn runtime_allocation(s: &StackReport) -> Option<&'static str> {
    s.frames.iter().chain(&s.wrappers).find_map(|f| {
        let name = f.function.as_deref()?;
        RUNTIME
            .iter()
            .find(|(function, _)| name == *function || name.starts_with(&format!("{function}(")))
            .map(|(_, what)| *what)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsan_patterns() {
        assert!(matches("leak_site", "my_leak_site_2"));
        assert!(matches("^leak_site$", "leak_site"));
        assert!(!matches("^leak_site$", "leak_site_2"));
        assert!(!matches("^leak", "my_leak"));
        assert!(matches("libfoo*.so", "/usr/lib/libfoo-1.2.so.3"));
        assert!(matches("std::*::push", "std::vec::Vec<T>::push"));
        assert!(!matches("a*b$", "a_b_c"));
        assert!(matches("a*c$", "a_b_c"));
        assert!(matches("*", "anything"));
    }

    #[test]
    fn parses_leak_rules_and_says_what_is_wrong() {
        let mut s = Suppressions::default();
        s.parse(
            "# comment\n\nleak:cache_fill\nrace:elsewhere\n leak: libvendor.so \n",
            "sup.txt",
        )
        .unwrap();
        let patterns: Vec<&str> = s.rules.iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(patterns, ["cache_fill", "libvendor.so"]);
        let err = s.parse("leak:ok\njust words\n", "bad.txt").unwrap_err();
        assert!(err.starts_with("bad.txt, line 2: `just words`"), "{err}");
        let err = s.parse("leak:\n", "empty.txt").unwrap_err();
        assert!(err.contains("no pattern"), "{err}");
    }
}
