//! The architecture rules of issue 16, checked on the source tree:
//!
//! - inside each crate, the module import graph (`use crate::…`, `super::…`, `self::…`
//!   and `child::…` references between files, re-exports followed to the file that
//!   defines the item) has no cycle of more than two files;
//! - the CLI depends on the facade, blockio and convert only (formats and the service
//!   crates checksum, stream and serve through the facade's re-exports);
//! - no `downcast` or `as_any()` call outside the format crates (the CLI's one error
//!   mapping may downcast error chains; wrappers may forward `as_any`);
//! - no function of more than [`MAX_FN_LINES`] lines (test code aside).
//!
//! `DISKIMG_IMPORT_GRAPH=1 cargo test -p diskimg --test it import_graph -- --nocapture`
//! prints each crate's graph and the crate graph (as drawn in docs/DESIGN.md).
//! Test code (`#[cfg(test)]` modules, `tests/`) is not part of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::import_parse::{Module, ModuleTree, format_crates, workspace_crates};

/// Crates whose import graph still has longer cycles: (crate, files in them, who removes
/// them). A ratchet: more files than listed fails, and so does a crate listed here that
/// has none left (take it off the list), so the list only shrinks.
const KNOWN_CYCLES: &[(&str, usize, &str)] = &[];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn printing() -> bool {
    std::env::var_os("DISKIMG_IMPORT_GRAPH").is_some()
}

/// Strongly connected components of `edges` (Tarjan), each sorted.
fn components(nodes: &[usize], edges: &BTreeMap<usize, BTreeSet<usize>>) -> Vec<Vec<usize>> {
    struct T<'a> {
        edges: &'a BTreeMap<usize, BTreeSet<usize>>,
        index: BTreeMap<usize, usize>,
        low: BTreeMap<usize, usize>,
        stack: Vec<usize>,
        on: BTreeSet<usize>,
        out: Vec<Vec<usize>>,
    }
    fn visit(t: &mut T<'_>, v: usize) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        let next: Vec<usize> = t.edges.get(&v).into_iter().flatten().copied().collect();
        for w in next {
            if !t.index.contains_key(&w) {
                visit(t, w);
                let lw = t.low[&w];
                let lv = t.low.get_mut(&v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(&w) {
                let iw = t.index[&w];
                let lv = t.low.get_mut(&v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[&v] == t.index[&v] {
            let mut c = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(&w);
                c.push(w);
                if w == v {
                    break;
                }
            }
            c.sort_unstable();
            t.out.push(c);
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for &n in nodes {
        if !t.index.contains_key(&n) {
            visit(&mut t, n);
        }
    }
    t.out
}

/// A cycle of three or more files inside component `c`, if there is one. In a strongly
/// connected component every cycle has two files exactly when every edge is answered by
/// one back and the files with their pairs form a tree.
fn long_cycle(c: &[usize], edges: &BTreeMap<usize, BTreeSet<usize>>) -> Option<Vec<usize>> {
    if c.len() < 3 {
        return None;
    }
    let set: BTreeSet<usize> = c.iter().copied().collect();
    let inner = |v: usize| -> Vec<usize> {
        edges
            .get(&v)
            .into_iter()
            .flatten()
            .copied()
            .filter(|w| set.contains(w))
            .collect()
    };
    let mut pairs = 0;
    let mut one_way = None;
    for &v in c {
        for w in inner(v) {
            if edges.get(&w).is_some_and(|b| b.contains(&v)) {
                pairs += 1;
            } else {
                one_way = Some((v, w));
            }
        }
    }
    if one_way.is_none() && pairs / 2 == c.len() - 1 {
        return None;
    }
    // Show one: a shortest path back from w to v closes v -> w (breadth-first).
    let (v, w) = one_way.unwrap_or((c[0], inner(c[0])[0]));
    let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([w]);
    let mut seen = BTreeSet::from([w]);
    while let Some(x) = queue.pop_front() {
        if x == v {
            break;
        }
        for y in inner(x) {
            if (x != w || y != v || one_way.is_some()) && seen.insert(y) {
                prev.insert(y, x);
                queue.push_back(y);
            }
        }
    }
    let mut path = vec![v];
    let mut x = v;
    while let Some(&p) = prev.get(&x) {
        path.push(p);
        x = p;
    }
    path.reverse();
    path.insert(0, v);
    Some(path)
}

/// A crate's longer cycles, as "crate: n files in one cycle, e.g. a.rs -> b.rs -> a.rs",
/// and the number of files in them.
fn cycles(tree: &ModuleTree) -> (Vec<String>, usize) {
    let nodes: Vec<usize> = (0..tree.modules.len()).collect();
    let mut out = Vec::new();
    let mut files = 0;
    for c in components(&nodes, &tree.edges) {
        if let Some(path) = long_cycle(&c, &tree.edges) {
            let names: Vec<&str> = path
                .iter()
                .map(|&i| tree.modules[i].file.as_str())
                .collect();
            files += c.len();
            out.push(format!(
                "{}: {} files in one cycle, e.g. {}",
                tree.name,
                c.len(),
                names.join(" -> ")
            ));
        }
    }
    (out, files)
}

fn print_graph(tree: &ModuleTree) {
    println!("## {}", tree.name);
    for (from, to) in &tree.edges {
        let m: &Module = &tree.modules[*from];
        let t: Vec<&str> = to.iter().map(|&i| tree.modules[i].file.as_str()).collect();
        println!("{} -> {}", m.file, t.join(", "));
    }
}

#[test]
fn no_import_cycle_of_more_than_two_files() {
    let mut failures = Vec::new();
    for (name, dir) in workspace_crates(&root()) {
        let tree = ModuleTree::load(&name, &dir);
        if printing() {
            print_graph(&tree);
        }
        let (found, files) = cycles(&tree);
        match KNOWN_CYCLES.iter().find(|(c, _, _)| *c == name) {
            Some((_, _, _)) if files == 0 => {
                failures.push(format!(
                    "{name}: no longer cyclic, remove it from KNOWN_CYCLES"
                ));
            }
            Some((_, known, who)) if files <= *known => {
                eprintln!("known ({files} files, removed by {who}):");
                for f in &found {
                    eprintln!("  {f}");
                }
                if files < *known {
                    eprintln!("  {name}: lower KNOWN_CYCLES to {files}");
                }
            }
            _ => failures.extend(found),
        }
    }
    assert!(
        failures.is_empty(),
        "import cycles:\n{}",
        failures.join("\n")
    );
}

/// The `[dependencies]` of a crate's manifest that are diskimg crates.
fn diskimg_deps(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_deps = l == "[dependencies]";
            continue;
        }
        let name = l.split(['.', '=', ' ']).next().unwrap_or_default();
        if in_deps && name.starts_with("diskimg") {
            out.push(name.to_string());
        }
    }
    out
}

#[test]
fn the_cli_depends_on_the_facade_convert_and_blockio_only() {
    let deps = diskimg_deps(&root().join("crates/cli/Cargo.toml"));
    assert!(deps.contains(&"diskimg".to_string()), "{deps:?}");
    let allowed = ["diskimg", "diskimg-blockio", "diskimg-convert"];
    let bad: Vec<&String> = deps
        .iter()
        .filter(|d| !allowed.contains(&d.as_str()))
        .collect();
    assert!(bad.is_empty(), "the CLI depends on {bad:?} directly");
    if printing() {
        println!("## crates");
        for (name, dir) in workspace_crates(&root()) {
            println!(
                "{name} -> {}",
                diskimg_deps(&dir.join("Cargo.toml")).join(", ")
            );
        }
    }
}

#[test]
fn no_downcast_outside_format_crates() {
    let formats = format_crates();
    let mut bad = Vec::new();
    for (name, dir) in workspace_crates(&root()) {
        if formats.contains(&name.as_str()) {
            continue;
        }
        let tree = ModuleTree::load(&name, &dir);
        for m in &tree.modules {
            let mut in_as_any = false;
            for (i, line) in m.code.lines().enumerate() {
                if line.contains("fn ") {
                    in_as_any = line.contains("fn as_any");
                }
                let mapping = m.file == "src/errmap.rs" && name == "diskimg-cli";
                let downcast = line.contains("downcast") && !mapping;
                let as_any = line.contains(".as_any()") && !in_as_any;
                if downcast || as_any {
                    bad.push(format!("{name} {}:{}: {}", m.file, i + 1, line.trim()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "downcasts:\n{}", bad.join("\n"));
}

/// The longest a function may be, in lines (issue 16: functions that fit on a screen).
const MAX_FN_LINES: usize = 120;

/// `(name, first line, lines)` of each function with a body in `code` (comments and
/// strings blanked, so braces are code).
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = code[from..].find("fn ") {
        let at = from + k;
        from = at + 3;
        if at > 0 && (b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_') {
            continue;
        }
        let name: String = code[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The body opens at the first `{` outside brackets, unless a `;` ends the
        // declaration first.
        let mut nest = 0i32;
        let mut open = None;
        for (i, c) in code[at..].char_indices() {
            match c {
                '(' | '[' => nest += 1,
                ')' | ']' => nest -= 1,
                ';' if nest == 0 => break,
                '{' if nest == 0 => {
                    open = Some(at + i);
                    break;
                }
                _ => {}
            }
        }
        let Some(open) = open.filter(|_| !name.is_empty()) else {
            continue;
        };
        let mut depth = 0;
        let close = code[open..].char_indices().find_map(|(i, c)| {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            (depth == 0).then_some(open + i)
        });
        if let Some(close) = close {
            let first = code[..at].matches('\n').count() + 1;
            out.push((name, first, code[at..close].matches('\n').count() + 1));
        }
    }
    out
}

#[test]
fn no_function_over_max_lines() {
    let mut long = Vec::new();
    for (name, dir) in workspace_crates(&root()) {
        let tree = ModuleTree::load(&name, &dir);
        for m in &tree.modules {
            for (f, line, n) in functions(&m.code) {
                if n > MAX_FN_LINES {
                    long.push(format!("{name} {}:{line}: fn {f} has {n} lines", m.file));
                }
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them at their seams):\n{}",
        long.join("\n")
    );
    let sample = "fn a(x: [u8; 2]) {\n    {\n    }\n}\nfn b();\n";
    assert_eq!(functions(sample), [("a".to_string(), 1, 4)]);
}
