//! The lexing half of [`super::import_parse`]: source with comments and literals blanked,
//! and the `#[cfg(test)]` modules found and dropped, so that only real code is read for
//! imports.

/// The source with comments and string/char literals blanked (newlines kept) and
/// `#[cfg(test)] mod x { … }` bodies removed.
pub(crate) fn strip(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let keep_nl = |c: char, out: &mut String| out.push(if c == '\n' { '\n' } else { ' ' });
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    keep_nl(b[i], &mut out);
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&b, i) {
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            out.push_str("\"\"");
            while j < b.len() {
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                keep_nl(b[j], &mut out);
                j += 1;
            }
            i = j;
        } else if c == '"' {
            out.push_str("\"\"");
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                if let Some(&x) = b.get(i) {
                    keep_nl(x, &mut out);
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' && (next == Some('\\') || b.get(i + 2) == Some(&'\'')) {
            // A char literal (a lifetime has no closing quote two characters on).
            i += 1;
            while i < b.len() && b[i] != '\'' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[char], i: usize) -> bool {
    i > 0
        && b.get(i - 1)
            .is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// After a `#[cfg(test)]` at `at`: the byte offset of the `mod` item it guards
/// (further attributes skipped), its name, and whether it has a body (`{`) or is a
/// file (`;`). `None` when the attribute guards something else.
fn test_mod_after(code: &str, at: usize) -> Option<(usize, String, bool)> {
    let mut i = at + "#[cfg(test)]".len();
    let b = code.as_bytes();
    loop {
        while b.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if b.get(i) == Some(&b'#') && b.get(i + 1) == Some(&b'[') {
            let mut depth = 0;
            while let Some(&c) = b.get(i) {
                i += 1;
                match c {
                    b'[' => depth += 1,
                    b']' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            continue;
        }
        break;
    }
    let rest = &code[i..];
    let rest = ["pub(crate) ", "pub(super) ", "pub "]
        .iter()
        .find_map(|p| rest.strip_prefix(p))
        .unwrap_or(rest);
    let rest = rest.strip_prefix("mod ")?;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    let after = rest[name.len()..].trim_start();
    let body = after.starts_with('{');
    (body || after.starts_with(';')).then(|| (code.len() - after.len(), name, body))
}

/// Names of the file modules declared `#[cfg(test)] mod x;`.
pub(crate) fn test_file_modules(code: &str) -> Vec<String> {
    code.match_indices("#[cfg(test)]")
        .filter_map(|(at, _)| test_mod_after(code, at))
        .filter(|(_, _, body)| !body)
        .map(|(_, name, _)| name)
        .collect()
}

/// Blanks `#[cfg(test)] mod name { … }` bodies (newlines kept).
pub(crate) fn drop_inline_tests(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut pos = 0;
    while let Some(found) = code[pos..].find("#[cfg(test)]") {
        let at = pos + found;
        let Some((open, _, true)) = test_mod_after(code, at) else {
            out.push_str(&code[pos..at + 1]);
            pos = at + 1;
            continue;
        };
        out.push_str(&code[pos..at]);
        let mut depth = 0;
        let mut end = code.len();
        for (k, ch) in code[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.extend(code[at..end].chars().filter(|&c| c == '\n'));
        pos = end;
    }
    out.push_str(&code[pos..]);
    out
}
