//! Reads a crate's source into its module tree and the import edges between its files,
//! for [`super::import_graph`]. A small lexer, not a Rust parser: comments, strings and
//! `#[cfg(test)]` modules are blanked (lines kept), `use` trees are expanded, and paths
//! through `crate`, `super`, `self` or a child module are resolved to the file that
//! defines their item, following `pub use` re-exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::import_lex::{drop_inline_tests, strip, test_file_modules};

/// The format crates: the only ones that may downcast a device.
pub(crate) fn format_crates() -> [&'static str; 7] {
    [
        "diskimg-raw",
        "diskimg-qcow2",
        "diskimg-luks",
        "diskimg-vmdk",
        "diskimg-vdi",
        "diskimg-vhdx",
        "diskimg-vhd",
    ]
}

/// `(package name, directory)` of the facade and every crate under `crates/`.
pub(crate) fn workspace_crates(root: &Path) -> Vec<(String, PathBuf)> {
    let mut dirs = vec![root.to_path_buf()];
    let mut sub: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Cargo.toml").exists())
        .collect();
    sub.sort();
    dirs.extend(sub);
    dirs.into_iter()
        .map(|d| {
            let text = std::fs::read_to_string(d.join("Cargo.toml")).unwrap();
            let name = text
                .lines()
                .skip_while(|l| l.trim() != "[package]")
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"').to_string())
                .unwrap();
            (name, d)
        })
        .collect()
}

/// One source file.
pub(crate) struct Module {
    /// Path relative to the crate directory (`src/device.rs`).
    pub(crate) file: String,
    /// Module path below the crate root (`["io", "rw"]`).
    path: Vec<String>,
    /// The source with comments, strings and test modules blanked.
    pub(crate) code: String,
    /// The source with comments and strings blanked (test modules kept).
    raw: String,
}

/// A crate's files and the import edges between them (indices into `modules`).
pub(crate) struct ModuleTree {
    /// Package name.
    pub(crate) name: String,
    /// Every library or binary source file.
    pub(crate) modules: Vec<Module>,
    /// `from -> {to}`.
    pub(crate) edges: BTreeMap<usize, BTreeSet<usize>>,
    by_path: BTreeMap<Vec<String>, usize>,
    /// `(module, name) -> absolute target path` of `pub use` items.
    reexports: BTreeMap<(usize, String), Vec<String>>,
    /// `module -> absolute module paths` of `pub use …::*`.
    globs: BTreeMap<usize, Vec<Vec<String>>>,
    /// `(module, name)` of `pub use` items from other crates (`pub use diskimg_luks as
    /// crypto`): paths through them leave the crate.
    externals: BTreeSet<(usize, String)>,
}

impl ModuleTree {
    /// Loads the crate in `dir` (its `src/`; `src/bin` and test-only files left out).
    pub(crate) fn load(name: &str, dir: &Path) -> Self {
        let mut t = ModuleTree {
            name: name.to_string(),
            modules: Vec::new(),
            edges: BTreeMap::new(),
            by_path: BTreeMap::new(),
            reexports: BTreeMap::new(),
            globs: BTreeMap::new(),
            externals: BTreeSet::new(),
        };
        let src = dir.join("src");
        for f in rs_files(&src) {
            let rel = f
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if rel.starts_with("bin/") {
                continue;
            }
            let mut path: Vec<String> = rel
                .trim_end_matches(".rs")
                .split('/')
                .map(String::from)
                .collect();
            if matches!(
                path.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                path.pop();
            }
            let raw = strip(&std::fs::read_to_string(&f).unwrap());
            t.by_path.insert(path.clone(), t.modules.len());
            t.modules.push(Module {
                file: format!("src/{rel}"),
                path,
                code: drop_inline_tests(&raw),
                raw,
            });
        }
        t.drop_test_modules();
        for i in 0..t.modules.len() {
            t.collect_reexports(i);
        }
        for i in 0..t.modules.len() {
            t.collect_edges(i);
        }
        t
    }

    /// Removes files declared `#[cfg(test)] mod x;` (and their children).
    fn drop_test_modules(&mut self) {
        let mut test_paths = Vec::new();
        for m in &self.modules {
            for name in test_file_modules(&m.raw) {
                let mut p = m.path.clone();
                p.push(name);
                test_paths.push(p);
            }
        }
        self.modules
            .retain(|m| !test_paths.iter().any(|p| m.path.starts_with(p)));
        self.by_path = self
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.path.clone(), i))
            .collect();
    }

    fn has_child(&self, module: usize, name: &str) -> bool {
        let mut p = self.modules[module].path.clone();
        p.push(name.to_string());
        self.by_path.contains_key(&p)
    }

    /// The absolute path of `segs` as written in module `m` (`None`: another crate).
    fn absolute(&self, m: usize, segs: &[String]) -> Option<Vec<String>> {
        let mut base = self.modules[m].path.clone();
        let mut rest = segs;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            Some(first) if self.has_child(m, first) => {}
            _ => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file defining the item at absolute path `abs`.
    fn resolve(&self, abs: &[String], depth: usize) -> Option<usize> {
        let mut cur = *self.by_path.get(&Vec::new())?;
        let mut path = Vec::new();
        for (i, seg) in abs.iter().enumerate() {
            path.push(seg.clone());
            if let Some(&child) = self.by_path.get(&path) {
                cur = child;
                continue;
            }
            if self.externals.contains(&(cur, seg.clone())) {
                return None;
            }
            if depth < 8 {
                if let Some(target) = self.reexports.get(&(cur, seg.clone())) {
                    let mut t = target.clone();
                    t.extend(abs[i + 1..].iter().cloned());
                    return self.resolve(&t, depth + 1);
                }
                for g in self.globs.get(&cur).into_iter().flatten() {
                    let Some(&gm) = self.by_path.get(g) else {
                        continue;
                    };
                    if defines(&self.modules[gm].code, seg) {
                        return Some(gm);
                    }
                }
            }
            return Some(cur);
        }
        Some(cur)
    }

    fn collect_reexports(&mut self, m: usize) {
        for (public, tree) in use_statements(&self.modules[m].code) {
            if !public {
                continue;
            }
            for (segs, alias) in expand(&tree) {
                let Some(abs) = self.absolute(m, &segs) else {
                    self.externals.insert((m, alias));
                    continue;
                };
                if alias == "*" {
                    self.globs.entry(m).or_default().push(abs);
                } else {
                    self.reexports.insert((m, alias), abs);
                }
            }
        }
    }

    fn add_edge(&mut self, from: usize, abs: &[String]) {
        if let Some(to) = self.resolve(abs, 0)
            && to != from
        {
            self.edges.entry(from).or_default().insert(to);
        }
    }

    fn collect_edges(&mut self, m: usize) {
        let code = self.modules[m].code.clone();
        for (public, tree) in use_statements(&code) {
            if public {
                continue;
            }
            for (segs, alias) in expand(&tree) {
                if let Some(abs) = self.absolute(m, &segs) {
                    let abs = if alias == "*" { abs } else { abs.clone() };
                    self.add_edge(m, &abs);
                }
            }
        }
        let body = remove_use_statements(&code);
        for segs in paths_in(&body) {
            let first = segs[0].as_str();
            let keyword = matches!(first, "crate" | "super" | "self");
            if (keyword || self.has_child(m, first))
                && let Some(abs) = self.absolute(m, &segs)
            {
                self.add_edge(m, &abs);
            }
        }
    }
}

/// Every `.rs` file under `dir`, sorted.
fn rs_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rs_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Whether `code` defines an item named `name` at some level.
fn defines(code: &str, name: &str) -> bool {
    [
        "fn", "struct", "enum", "trait", "type", "const", "static", "mod", "union",
    ]
    .iter()
    .any(|k| {
        code.match_indices(&format!("{k} {name}")).any(|(i, _)| {
            let after = code[i + k.len() + 1 + name.len()..].chars().next();
            !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

/// `(is pub, use tree)` of every `use` statement.
fn use_statements(code: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for (start, len) in use_spans(code) {
        let stmt = &code[start..start + len];
        let public = stmt.trim_start().starts_with("pub");
        let tree = stmt
            .split_once("use ")
            .map(|(_, t)| t.trim_end_matches(';'))
            .unwrap_or_default();
        out.push((
            public,
            tree.split_whitespace().collect::<Vec<_>>().join(" "),
        ));
    }
    out
}

/// Byte spans of `[pub[(…)]] use …;` statements.
fn use_spans(code: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut line_start = 0;
    for line in code.split_inclusive('\n') {
        let t = line.trim_start();
        let lead = line.len() - t.len();
        let is_use = t.starts_with("use ")
            || (t.starts_with("pub")
                && t.split_once(' ')
                    .is_some_and(|(p, r)| !p.contains('{') && r.starts_with("use ")));
        if is_use {
            let start = line_start + lead;
            let len = code[start..]
                .find(';')
                .map_or(code.len() - start, |k| k + 1);
            out.push((start, len));
        }
        line_start += line.len();
    }
    out
}

fn remove_use_statements(code: &str) -> String {
    let mut out = code.to_string();
    for (start, len) in use_spans(code).into_iter().rev() {
        let blank: String = code[start..start + len]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(start..start + len, &blank);
    }
    out
}

/// Expands `a::b::{c, d::{e as f}, self, *}` into `(segments, bound name)` pairs; the
/// name is `*` for a glob.
fn expand(tree: &str) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    expand_into(&[], tree.trim(), &mut out);
    out
}

fn expand_into(prefix: &[String], tree: &str, out: &mut Vec<(Vec<String>, String)>) {
    let tree = tree.trim().trim_start_matches("::");
    if tree.is_empty() {
        return;
    }
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let mut p = prefix.to_vec();
        p.extend(head);
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        for part in split_top(inner) {
            expand_into(&p, part, out);
        }
        return;
    }
    let (path, alias) = match tree.split_once(" as ") {
        Some((p, a)) => (p.trim(), Some(a.trim().to_string())),
        None => (tree, None),
    };
    let mut segs = prefix.to_vec();
    segs.extend(path.split("::").map(str::trim).map(String::from));
    let last = segs.last().cloned().unwrap_or_default();
    if last == "self" {
        segs.pop();
    }
    let name = alias.unwrap_or_else(|| segs.last().cloned().unwrap_or_default());
    if last == "*" {
        segs.pop();
        out.push((segs, "*".into()));
    } else {
        out.push((segs, name));
    }
}

/// Splits `a, b::{c, d}, e` at the commas outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// Every path `a::b::c` in `code` that starts a path (not preceded by `::` or an
/// identifier character), as segments.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let b = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !ident(b[i]) || (i > 0 && (ident(b[i - 1]) || b[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < b.len() && ident(b[j]) {
                j += 1;
            }
            segs.push(code[s..j].to_string());
            if b.get(j) == Some(&b':')
                && b.get(j + 1) == Some(&b':')
                && b.get(j + 2).is_some_and(|&c| ident(c))
            {
                j += 2;
            } else {
                break;
            }
        }
        if segs.len() > 1 {
            out.push(segs);
        }
        i = j.max(i + 1);
    }
    out
}
