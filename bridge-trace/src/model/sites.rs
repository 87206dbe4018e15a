//! Which frame of a stack is its call site: the first frame above the allocator that is not an
//! allocation wrapper. One rule for every output (`record`'s reports, `watch`, `top`, `diff`,
//! pprof's `drop_frames`), on function names only.
//!
//! A frame is a wrapper when, counting from the allocator outwards, it is still in the run of
//! wrappers that starts at the allocator's direct caller, and
//! - it is one of the well-known ones ([`KNOWN`]: the C++ operators, the `x*`/`g_*`/`z*`
//!   families of C servers, the C++ library's allocator plumbing, Python's and glib's raw
//!   allocators), or
//! - it was named with `--wrapper NAME` (exact, or a prefix when NAME ends in `*`), or
//! - it is detected from the stacks of a report ([`Wrappers::detect`]): it sits directly on the
//!   allocator (or on another wrapper), its own name ends in a word that says it allocates
//!   (`malloc`, `calloc`, `realloc`, `alloc`, `zalloc`, `strdup`, `strndup`, `memdup`, `new`,
//!   also with a one-letter family prefix: `xmalloc`, `my_calloc`, `pool_alloc`, `json_new`),
//!   and it is called from at least two different functions. Such a function serves many
//!   callers and only forwards their requests; one with a single caller keeps the site (its
//!   caller is right below it anyway), and a function that does its own work between
//!   (`make_buffer`, `parse_line`) is never a wrapper.
//!
//! Frames below the site are kept: sites reached through one wrapper from different callers
//! stay apart.
use serde::{Deserialize, Serialize};

/// Wrappers known by name; an entry ending in `*` is a prefix.
pub const KNOWN: &[&str] = &[
    // The C++ runtime's operators end in malloc.
    "operator new*",
    // libstdc++'s allocator plumbing (template instances, any element type).
    "std::allocator*::allocate*",
    "std::__new_allocator*::allocate*",
    "__gnu_cxx::new_allocator*::allocate*",
    "std::allocator_traits*::allocate*",
    // C libraries' own string duplicators.
    "strdup",
    "__strdup",
    "strndup",
    "__strndup",
    // GNU/BSD-style servers (git, OpenSSH, coreutils, bash, rsync, ...).
    "xmalloc",
    "xcalloc",
    "xrealloc",
    "xreallocarray",
    "xzalloc",
    "xstrdup",
    "xstrndup",
    "xmemdup",
    // glib.
    "g_malloc",
    "g_malloc0",
    "g_malloc_n",
    "g_malloc0_n",
    "g_realloc",
    "g_realloc_n",
    "g_try_malloc",
    "g_try_malloc0",
    "g_try_realloc",
    "g_strdup",
    "g_strndup",
    "g_memdup",
    "g_memdup2",
    // Redis and friends.
    "zmalloc",
    "zcalloc",
    "zrealloc",
    "ztrymalloc*",
    "ztrycalloc*",
    "ztryrealloc*",
    "zstrdup",
    // CPython's raw allocators.
    "PyMem_RawMalloc",
    "PyMem_RawCalloc",
    "PyMem_RawRealloc",
    "_PyMem_RawMalloc",
    "_PyMem_RawCalloc",
    "_PyMem_RawRealloc",
    "PyMem_Malloc",
    "PyMem_Calloc",
    "PyMem_Realloc",
    "_PyMem_DebugRawAlloc",
    // OpenSSL.
    "CRYPTO_malloc",
    "CRYPTO_zalloc",
    "CRYPTO_realloc",
    "CRYPTO_strdup",
    "CRYPTO_strndup",
];

/// Candidate wrappers and the functions seen calling them.
#[derive(Clone, Debug, Default)]
pub struct Callers(std::collections::BTreeMap<String, std::collections::BTreeSet<String>>);

/// Words of a name that say it allocates.
const ALLOCATING_WORDS: &[&str] = &[
    "malloc", "calloc", "realloc", "alloc", "zalloc", "strdup", "strndup", "memdup", "new",
];

/// The rule: known wrappers, detected ones, and the user's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wrappers {
    /// `--wrapper NAME`, as given.
    pub user: Vec<String>,
    /// Detected from a report's stacks (function names without parameters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detected: Vec<String>,
}

impl Wrappers {
    pub fn is_default(&self) -> bool {
        self.user.is_empty() && self.detected.is_empty()
    }

    pub fn new(user: Vec<String>) -> Wrappers {
        Wrappers {
            user,
            detected: Vec::new(),
        }
    }

    /// Whether `name` (a demangled function name, parameters included or not) is a wrapper
    /// when it sits in the run of wrappers on top of the allocator.
    pub fn is_wrapper(&self, name: &str) -> bool {
        let bare = without_parameters(name);
        KNOWN
            .iter()
            .copied()
            .chain(self.user.iter().map(String::as_str))
            .any(|p| matches(p, bare) || matches(p, name))
            || self.detected.iter().any(|d| d == bare)
    }

    /// Adds the wrappers these stacks show (each a list of function names, innermost first):
    /// see the module's rule. Repeated so that a detected wrapper's own wrapper is found too.
    pub fn detect(&mut self, stacks: &[Vec<Option<&str>>]) {
        loop {
            let mut callers = Callers::default();
            for names in stacks {
                self.observe(&mut callers, names);
            }
            if !self.promote(&callers) {
                break;
            }
        }
    }

    /// Notes the caller of the frame past this stack's wrappers when that frame is named
    /// like an allocator (a candidate wrapper).
    pub fn observe(&self, callers: &mut Callers, names_innermost_first: &[Option<&str>]) {
        let run = self.run(names_innermost_first.iter().copied());
        let (Some(Some(candidate)), Some(Some(caller))) = (
            names_innermost_first.get(run),
            names_innermost_first.get(run + 1),
        ) else {
            return;
        };
        let bare = without_parameters(candidate);
        if says_it_allocates(bare) && !self.detected.iter().any(|d| d == bare) {
            callers
                .0
                .entry(bare.to_string())
                .or_default()
                .insert(without_parameters(caller).to_string());
        }
    }

    /// Makes the candidates seen from two or more callers wrappers; whether there were any.
    pub fn promote(&mut self, callers: &Callers) -> bool {
        let found: Vec<String> = callers
            .0
            .iter()
            .filter(|(name, c)| c.len() >= 2 && !self.detected.contains(name))
            .map(|(name, _)| name.clone())
            .collect();
        self.detected.extend(found.iter().cloned());
        self.detected.sort();
        !found.is_empty()
    }

    /// How many of `names` (innermost first) are wrappers: the length of the run of wrappers
    /// from the allocator outwards, never all of them (the last one left is the site).
    pub fn run<'a>(
        &self,
        names_innermost_first: impl IntoIterator<Item = Option<&'a str>>,
    ) -> usize {
        let names: Vec<Option<&str>> = names_innermost_first.into_iter().collect();
        let run = names
            .iter()
            .take_while(|n| n.is_some_and(|n| self.is_wrapper(n)))
            .count();
        run.min(names.len().saturating_sub(1))
    }

    /// The rule as a regular expression over function names, for pprof's `drop_frames` (which
    /// drops a matching frame and every frame it calls): the known, the user's and the
    /// detected wrappers.
    pub fn drop_frames_regex(&self) -> String {
        let mut parts: Vec<String> = KNOWN
            .iter()
            .map(|p| p.to_string())
            .chain(self.user.iter().cloned())
            .map(|p| pattern_regex(&p))
            .chain(
                self.detected
                    .iter()
                    .map(|d| format!("{}(\\(.*)?", regex_escape(d))),
            )
            .collect();
        parts.sort();
        parts.dedup();
        format!("^({})$", parts.join("|"))
    }
}

/// `p` (exact, or a prefix when it ends in `*`, with `*` inside matching anything) against
/// `name`.
fn matches(p: &str, name: &str) -> bool {
    let mut rest = name;
    let parts: Vec<&str> = p.split('*').collect();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 && !part.is_empty() {
            return rest.ends_with(part) || rest.contains(&format!("{part}("));
        } else if !part.is_empty() {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    parts.len() > 1 || rest.is_empty()
}

fn pattern_regex(p: &str) -> String {
    let body: Vec<String> = p.split('*').map(regex_escape).collect();
    let joined = body.join(".*");
    if p.ends_with('*') {
        joined
    } else {
        format!("{joined}(\\(.*)?")
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `f(int, char*)` → `f`; `ns::T<int>::g() const` → `ns::T<int>::g`.
pub fn without_parameters(name: &str) -> &str {
    let name = name.trim();
    if name.starts_with("operator") || !name.contains('(') {
        // `operator new(unsigned long)`: the operator's name has a space; keep it whole up to
        // its parameters.
        return name.split('(').next().unwrap_or(name).trim_end();
    }
    let mut depth = 0i32;
    for (i, c) in name.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            '(' if depth <= 0 => return name[..i].trim_end(),
            _ => {}
        }
    }
    name
}

/// The function's own name (after the last `::`) has an allocating word as its last word:
/// `xmalloc`, `my_calloc`, `pool_alloc`, `buf_strdup`, `Arena::alloc`, `json_new`.
fn says_it_allocates(bare: &str) -> bool {
    let own = bare.rsplit("::").next().unwrap_or(bare);
    if own.is_empty() || own.contains(['<', ' ']) {
        return false;
    }
    let lower = own.to_ascii_lowercase();
    let last_word = lower.rsplit('_').find(|w| !w.is_empty()).unwrap_or(&lower);
    ALLOCATING_WORDS.iter().any(|w| {
        // `xmalloc`, `zcalloc`, `gmalloc`: one letter of prefix glued on is a family prefix.
        last_word == *w || (last_word.len() == w.len() + 1 && last_word.ends_with(w) && *w != "new")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_user_and_detected_wrappers() {
        let w = Wrappers::new(vec!["pool_take".into(), "Arena::grab*".into()]);
        for name in [
            "operator new(unsigned long)",
            "operator new[](unsigned long, std::nothrow_t const&)",
            "xmalloc",
            "g_malloc0",
            "zmalloc",
            "__gnu_cxx::new_allocator<int>::allocate(unsigned long, void const*)",
            "std::__new_allocator<char>::allocate(unsigned long, void const*)",
            "pool_take",
            "Arena::grab_bytes(unsigned long)",
        ] {
            assert!(w.is_wrapper(name), "{name}");
        }
        for name in [
            "make_buffer(unsigned long)",
            "leak_site",
            "main",
            "my_malloc",
            "std::vector<int, std::allocator<int> >::push_back(int const&)",
        ] {
            assert!(!w.is_wrapper(name), "{name}");
        }
        for name in [
            "my_malloc",
            "buf_strdup",
            "pool_alloc",
            "json_new",
            "Arena::alloc",
            "xmalloc",
        ] {
            assert!(says_it_allocates(name), "{name}");
        }
        for name in [
            "renew_lease",
            "allocate_session_table_and_fill",
            "newline",
            "make_buffer",
        ] {
            assert!(!says_it_allocates(name), "{name}");
        }
    }

    /// A function that says it allocates and serves two callers is a wrapper; `leak_malloc`
    /// called from `main` alone, twice, keeps its site; a wrapper of a detected wrapper is
    /// found too.
    #[test]
    fn wrappers_are_detected_from_the_stacks() {
        let mut w = Wrappers::default();
        let stacks = vec![
            vec![
                Some("my_malloc(unsigned long)"),
                Some("handle_a"),
                Some("main"),
            ],
            vec![
                Some("my_malloc(unsigned long)"),
                Some("handle_b"),
                Some("main"),
            ],
            vec![
                Some("my_malloc(unsigned long)"),
                Some("my_strdup"),
                Some("parse_x"),
            ],
            vec![
                Some("my_malloc(unsigned long)"),
                Some("my_strdup"),
                Some("parse_y"),
            ],
            vec![Some("leak_malloc"), Some("main")],
            vec![Some("leak_malloc"), Some("main")],
            vec![Some("make_buffer"), Some("a")],
            vec![Some("make_buffer"), Some("b")],
        ];
        w.detect(&stacks);
        assert_eq!(w.detected, ["my_malloc", "my_strdup"]);
        assert_eq!(w.run(stacks[2].iter().copied()), 2);
        assert_eq!(w.run(stacks[4].iter().copied()), 0);
        assert!(w.drop_frames_regex().contains("my_strdup(\\(.*)?"));
    }

    #[test]
    fn the_run_stops_at_the_first_real_frame_and_leaves_a_site() {
        let w = Wrappers::default();
        let run = |names: &[Option<&str>]| w.run(names.iter().copied());
        assert_eq!(
            run(&[
                Some("operator new(unsigned long)"),
                Some("make_buffer(unsigned long)"),
                Some("main")
            ]),
            1
        );
        assert_eq!(
            run(&[
                Some("xstrdup"),
                Some("xmalloc"),
                Some("handle"),
                Some("xmalloc")
            ]),
            2
        );
        // An unnamed frame ends the run.
        assert_eq!(run(&[None, Some("xmalloc")]), 0);
        // Only wrappers: the outermost one stays as the site.
        assert_eq!(run(&[Some("xmalloc"), Some("g_malloc")]), 1);
        assert_eq!(run(&[]), 0);
    }

    #[test]
    fn drop_frames_is_the_same_rule() {
        let w = Wrappers::new(vec!["pool_take".into()]);
        let mut w = w;
        w.detected = vec!["my_malloc".into()];
        let re = w.drop_frames_regex();
        assert!(re.starts_with("^(") && re.ends_with(")$"), "{re}");
        assert!(re.contains("operator new.*"), "{re}");
        assert!(re.contains("pool_take(\\(.*)?"), "{re}");
        assert!(re.contains("my_malloc(\\(.*)?"), "{re}");
        assert!(!re.contains("my_malloc(unsigned"), "{re}");
    }
}
