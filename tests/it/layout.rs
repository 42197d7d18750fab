//! The source layout rules, checked on every `cargo test`: no import cycle
//! between the library's top-level modules, and no source file longer than a
//! newcomer can read in one sitting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The library module a file holds (`admin/server.rs` is `admin::server`,
/// `store/mod.rs` is `store`); `None` for the crate root and the binary
/// (`main.rs`, `cli/`).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_str().unwrap().to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if matches!(parts[0].as_str(), "lib" | "main" | "cli") {
        return None;
    }
    Some(parts.join("::"))
}

/// Every path a piece of code names through `crate::`, with `use` groups
/// expanded: `crate::store::{Batch, partials::Run}` gives `store::Batch`
/// and `store::partials::Run`.
fn crate_paths(code: &str) -> Vec<String> {
    fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
        let tree = tree.trim();
        let Some(open) = tree.find('{') else {
            let path: String = tree
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(format!("{prefix}{}", path.trim_end_matches(':')));
            return;
        };
        let head = format!("{prefix}{}", &tree[..open]);
        let (mut depth, mut item) = (0usize, open + 1);
        for (j, ch) in tree.char_indices().skip(open + 1) {
            match ch {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(&head, &tree[item..j], out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&head, &tree[item..j], out);
                    item = j + 1;
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        // One path or use tree: up to its closing brace, else its end.
        let end = if rest.starts_with('{')
            || rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .is_some_and(|p| rest[p.len()..].starts_with('{'))
        {
            let mut depth = 0;
            rest.char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => return false,
                    }
                    depth == 0
                })
                .map_or(rest.len(), |(j, _)| j + 1)
        } else {
            rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len())
        };
        expand("", &rest[..end], &mut out);
    }
    out.retain(|p| !p.is_empty() && p != "self");
    out
}

/// The module a path names: its longest prefix that is a module.
fn resolve(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| modules.contains(m))
}

fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

fn code_without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module graph, like `cargo modules`' uses: an edge for every module
/// another names, apart from a module's own ancestors and descendants
/// (a parent re-exporting its child, a child using its parent's items).
#[test]
fn no_import_cycle_between_modules() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let by_module: BTreeMap<String, PathBuf> = files
        .iter()
        .filter_map(|f| Some((module_of(f)?, f.clone())))
        .collect();
    let modules: BTreeSet<String> = by_module.keys().cloned().collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, f) in &by_module {
        let code = code_without_comments(&std::fs::read_to_string(f).unwrap());
        let deps: BTreeSet<String> = crate_paths(&code)
            .iter()
            .filter_map(|p| resolve(p, &modules))
            .filter(|d| !related(m, d))
            .collect();
        graph.insert(m.clone(), deps);
    }
    // Depth-first search; a module met again while still open closes a cycle.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(1) => {
                let start = path.iter().position(|p| p == n).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    assert!(graph.len() > 40, "{} modules found", graph.len());
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if let Some(cycle) = visit(n, &graph, &mut state, &mut Vec::new()) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn crate_paths_expand_use_groups() {
    let paths = crate_paths(
        "use crate::store::{Batch, partials::{Run, parse}};\nuse crate::{\n    clock::Clock,\n    metrics,\n};\nlet x = crate::ident::normalize(m);",
    );
    assert_eq!(
        paths,
        [
            "store::Batch",
            "store::partials::Run",
            "store::partials::parse",
            "clock::Clock",
            "metrics",
            "ident::normalize"
        ]
    );
}

#[test]
fn no_source_file_longer_than_a_sitting() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "examples", "tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MAX_LINES)
                .then(|| format!("{} ({n} lines)", f.strip_prefix(root).unwrap().display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}
