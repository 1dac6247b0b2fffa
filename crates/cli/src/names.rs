//! How qemu names an image argument: `json:{…}` names read as option dictionaries, the
//! host path behind a `file:` prefix, and the name its tools show for `json:{…}` and
//! `--image-opts` arguments (qemu's `bdrv_refresh_filename`).
//!
//! qemu shows the plain file name when the options only say which format sits on which
//! file (`json:{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"}}`,
//! `driver=qcow2,file.filename=t.qcow2`): nothing else would be needed to open the image
//! again. Any other option (a blkdebug node, a runtime option) keeps the `json:` name.
//! A `file:` prefix names the file protocol explicitly; qemu shows the name without it,
//! behind `./` when the rest would read as another protocol prefix (`image:top.qcow2`).

use anyhow::{Result, anyhow, bail};
use diskimg::OptionList;
use serde_json::Value;

/// The host path of a file name: without qemu's `file:` protocol prefix.
pub(crate) fn host_path(arg: &str) -> &str {
    arg.strip_prefix("file:").unwrap_or(arg)
}

/// qemu's `path_has_protocol`: a colon before the first slash.
fn looks_like_protocol(path: &str) -> bool {
    path.split('/')
        .next()
        .is_some_and(|first| first.contains(':'))
}

/// The name qemu's tools show for the image argument `arg` (`image_opts`: the argument is
/// an `--image-opts` option string).
pub(crate) fn shown(arg: &str, image_opts: bool) -> String {
    if let Some(path) = arg.strip_prefix("file:") {
        return if looks_like_protocol(path) {
            format!("./{path}")
        } else {
            path.to_string()
        };
    }
    let dict = if arg.starts_with("json:") {
        flatten_json(arg).ok()
    } else if image_opts && arg.contains('=') {
        OptionList::parse(arg).ok()
    } else {
        None
    };
    match dict {
        Some(d) => plain_file(&d).unwrap_or_else(|| {
            if arg.starts_with("json:") {
                arg.to_string()
            } else {
                json_name(&d)
            }
        }),
        None => arg.to_string(),
    }
}

/// qemu's `json:{…}` name for an option dictionary (dotted keys nested).
fn json_name(d: &OptionList) -> String {
    use serde_json::{Map, Value};
    let mut root = Map::new();
    for (k, v) in d.entries() {
        let mut node = &mut root;
        let mut parts = k.split('.').peekable();
        while let Some(p) = parts.next() {
            if parts.peek().is_none() {
                node.insert(p.to_string(), Value::String(v.clone()));
                break;
            }
            let child = node
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                *child = Value::Object(Map::new());
            }
            match child {
                Value::Object(m) => node = m,
                _ => break,
            }
        }
    }
    format!("json:{}", Value::Object(root))
}

/// The file name of a dictionary that names only a format on a file.
fn plain_file(d: &OptionList) -> Option<String> {
    let mut file = None;
    for (k, v) in d.entries() {
        match k.as_str() {
            "driver" => {}
            "file.driver" if v == "file" => {}
            "file" | "file.filename" if file.is_none() => file = Some(v.clone()),
            _ => return None,
        }
    }
    file
}

/// qemu's JSON parser also takes single-quoted strings: rewrites them as JSON strings.
fn double_quotes(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    let mut in_double = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_double = !in_double;
                out.push(c);
            }
            '\\' if in_double => {
                out.push(c);
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            '\'' if !in_double => {
                out.push('"');
                while let Some(n) = chars.next() {
                    match n {
                        '\'' => break,
                        '"' => out.push_str("\\\""),
                        '\\' => match chars.next() {
                            Some('\'') => out.push('\''),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => {}
                        },
                        other => out.push(other),
                    }
                }
                out.push('"');
            }
            other => out.push(other),
        }
    }
    out
}

/// Flattens the object of a `json:{…}` file name into dotted keys (qemu's
/// `qdict_flatten`: `{"file":{"filename":"x"}}` → `file.filename=x`).
pub(crate) fn flatten_json(name: &str) -> Result<OptionList> {
    let text = name.strip_prefix("json:").unwrap_or(name);
    let v: Value = serde_json::from_str(&double_quotes(text))
        .map_err(|e| anyhow!("Could not parse the JSON options: {e}"))?;
    let Value::Object(_) = v else {
        bail!("Invalid JSON object given");
    };
    let mut out = OptionList::new();
    flatten("", &v, &mut out);
    Ok(out)
}

fn flatten(prefix: &str, v: &Value, out: &mut OptionList) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&key(k), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&key(&i.to_string()), v, out);
            }
        }
        Value::String(s) => out.set(prefix, s),
        Value::Bool(b) => out.set(prefix, if *b { "on" } else { "off" }),
        Value::Number(n) => out.set(prefix, &n.to_string()),
        Value::Null => out.set(prefix, "null"),
    }
}

/// Parses a qemu boolean option with qemu's message.
pub(crate) fn parse_bool(key: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => anyhow::bail!("Parameter '{key}' expects 'on' or 'off'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_quotes_become_json_strings() {
        assert_eq!(
            double_quotes(r#"{'a': 'x"y', "b": 'it\'s'}"#),
            r#"{"a": "x\"y", "b": "it's"}"#
        );
    }

    #[test]
    fn names_as_qemu_shows_them() {
        assert_eq!(host_path("file:a:b.qcow2"), "a:b.qcow2");
        assert_eq!(host_path("/x/a:b.qcow2"), "/x/a:b.qcow2");
        assert_eq!(shown("file:image:top.qcow2", false), "./image:top.qcow2");
        assert_eq!(shown("file:/d/a:b.qcow2", false), "/d/a:b.qcow2");
        assert_eq!(
            shown(
                "json:{'driver':'qcow2','file':{'driver':'file','filename':'/d/t.qcow2'}}",
                false
            ),
            "/d/t.qcow2"
        );
        assert_eq!(
            shown("driver=qcow2,file.driver=file,file.filename=/d/t", true),
            "/d/t"
        );
        let secret = shown(
            "driver=qcow2,file.filename=/d/t,encrypt.key-secret=s0",
            true,
        );
        assert_eq!(
            secret,
            r#"json:{"driver":"qcow2","file":{"filename":"/d/t"},"encrypt":{"key-secret":"s0"}}"#
        );
        // As a file name (no --image-opts) the argument is the name.
        assert_eq!(
            shown("driver=qcow2,file.filename=t", false),
            "driver=qcow2,file.filename=t"
        );
        let debug = "json:{'driver':'qcow2','file':{'driver':'blkdebug','image':{'driver':'file','filename':'t'}}}";
        assert_eq!(shown(debug, false), debug);
    }
}
