//! qemu's JSON printers: the QObject pretty printer (info, check) and the one-entry-
//! per-line `map` printer.

use diskimg::MapEntry;
use diskimg::blockio::InfoValue;
use serde_json::{Map, Value};

/// Converts format-specific info into JSON, keeping key order.
pub(crate) fn info_value(v: &InfoValue) -> Value {
    match v {
        InfoValue::Bool(b) => Value::Bool(*b),
        InfoValue::Int(i) => Value::from(*i),
        InfoValue::Str(s) => Value::String(s.clone()),
        InfoValue::List(l) => Value::Array(l.iter().map(info_value).collect()),
        InfoValue::Map(m) => Value::Object(info_map(m)),
    }
}

/// Converts an ordered key/value list into a JSON object, keeping key order.
pub(crate) fn info_map(m: &[(String, InfoValue)]) -> Map<String, Value> {
    m.iter().map(|(k, v)| (k.clone(), info_value(v))).collect()
}

/// Prints `v` as qemu's `qobject_to_json_pretty` does: four-space indent, `"k": v`,
/// empty containers on two lines.
pub(crate) fn pretty(v: &Value) -> String {
    let mut s = String::new();
    write_value(v, 0, &mut s);
    s
}

fn indent(level: usize, s: &mut String) {
    for _ in 0..level {
        s.push_str("    ");
    }
}

fn write_value(v: &Value, level: usize, s: &mut String) {
    match v {
        Value::Object(m) => {
            s.push('{');
            let mut first = true;
            for (k, v) in m {
                if !first {
                    s.push(',');
                }
                first = false;
                s.push('\n');
                indent(level + 1, s);
                s.push_str(&Value::String(k.clone()).to_string());
                s.push_str(": ");
                write_value(v, level + 1, s);
            }
            s.push('\n');
            indent(level, s);
            s.push('}');
        }
        Value::Array(a) => {
            s.push('[');
            let mut first = true;
            for v in a {
                if !first {
                    s.push(',');
                }
                first = false;
                s.push('\n');
                indent(level + 1, s);
                write_value(v, level + 1, s);
            }
            s.push('\n');
            indent(level, s);
            s.push(']');
        }
        other => s.push_str(&other.to_string()),
    }
}

/// One `qemu-img map --output=json` line (without separator).
pub(crate) fn map_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_like_qemu() {
        let v: Value =
            serde_json::from_str(r#"{"children": [], "a": {"type": "file", "data": {}}, "n": 1}"#)
                .unwrap_or(Value::Null);
        // The shape qemu-img info prints (see qemu-img-surface.md §3.1).
        assert_eq!(
            pretty(&v),
            "{\n    \"children\": [\n    ],\n    \"a\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    },\n    \"n\": 1\n}"
        );
    }
}
