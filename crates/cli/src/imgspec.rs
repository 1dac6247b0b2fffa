//! Image specifications beyond a plain file name: qemu's `json:{…}` pseudo-protocol and
//! flattened option dictionaries (`driver=qcow2,file.filename=F,backing=null`), turned
//! into what the facade opens: a path, a format, and driver options.
//!
//! Keys that only tune qemu's block layer (node names, cache and locking modes, discard
//! and detect-zeroes settings) are accepted and ignored; `backing=null` (or `""`) opens
//! without the backing chain. A `file` child other than the `file` protocol is refused
//! with qemu's wording where it would reach a host device or another protocol.

use anyhow::{Result, anyhow, bail};
use diskimg::{Format, OptionList};
use serde_json::Value;

/// Flattens the object of a `json:{…}` file name into dotted keys (qemu's
/// `qdict_flatten`: `{"file":{"filename":"x"}}` → `file.filename=x`).
pub(crate) fn flatten_json(name: &str) -> Result<OptionList> {
    let text = name.strip_prefix("json:").unwrap_or(name);
    let v: Value =
        serde_json::from_str(text).map_err(|e| anyhow!("Could not parse the JSON options: {e}"))?;
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

/// What a flattened option dictionary opens.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// The image file.
    pub(crate) path: String,
    /// The format (`driver`), when given.
    pub(crate) format: Option<Format>,
    /// `read-only` from the options, when given.
    pub(crate) read_only: Option<bool>,
    /// False with `backing=null`.
    pub(crate) open_backing: bool,
    /// A `copy-on-read` filter was named above the format.
    pub(crate) copy_on_read: bool,
    /// The remaining keys, for the format driver (and `backing.` for the chain).
    pub(crate) driver_options: OptionList,
}

/// Keys of qemu's generic block layer that change nothing here.
const IGNORED: &[&str] = &[
    "node-name",
    "file.node-name",
    "backing.node-name",
    "cache.direct",
    "cache.no-flush",
    "file.cache.direct",
    "file.cache.no-flush",
    "discard",
    "detect-zeroes",
    "file.locking",
    "file.aio",
    "file.aio-max-batch",
    "auto-read-only",
    "force-share",
    "file.driver",
];

/// Parses a qemu boolean option with qemu's message.
pub(crate) fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("Parameter '{key}' expects 'on' or 'off'"),
    }
}

/// Moves every `prefix.`-key of `o` up one level (`file.file.filename` → `file.filename`).
fn descend(o: &OptionList, prefix: &str) -> OptionList {
    let mut out = OptionList::new();
    let p = format!("{prefix}.");
    for (k, v) in o.entries() {
        if let Some(rest) = k.strip_prefix(&p) {
            out.set(rest, v);
        }
    }
    out
}

/// Resolves a dictionary; `name` is a plain file name given beside it (qemu-io's
/// `open -o OPTS FILE`), `format` the `-f` format.
pub(crate) fn resolve(
    mut o: OptionList,
    name: Option<&str>,
    format: Option<Format>,
) -> Result<Resolved> {
    let mut copy_on_read = false;
    // Filters above the format: the format node is their `file` child.
    while o.get("driver") == Some("copy-on-read") {
        copy_on_read = true;
        o = descend(&o, "file");
    }
    let format = match o.take("driver").as_deref() {
        None => format,
        Some("file") => Some(Format::Raw),
        Some(d) => Some(Format::from_name(d).map_err(|_| anyhow!("Unknown driver '{d}'"))?),
    };
    if let Some(d) = o.get("file.driver")
        && d != "file"
    {
        match d {
            "host_device" | "host_cdrom" => {
                let f = o.get("file.filename").unwrap_or("");
                bail!("'{d}' driver requires '{f}' to be either a character or block device");
            }
            "raw" | "qcow2" | "vmdk" | "vdi" | "vhdx" | "vpc" => {
                bail!("diskimg opens a format only directly on a file (file.driver={d})")
            }
            _ => bail!("Unknown protocol '{d}' (diskimg supports only 'file')"),
        }
    }
    let path = match (
        o.take("file.filename"),
        o.take("file"),
        name.map(str::to_string),
    ) {
        (Some(p), None, None) | (None, Some(p), None) | (None, None, Some(p)) => {
            p.strip_prefix("file:").unwrap_or(&p).to_string()
        }
        (None, None, None) => bail!("A block device must be specified for \"file\""),
        _ => bail!("Cannot specify both 'file' and 'file.filename', or a file name with either"),
    };
    let read_only = o
        .take("read-only")
        .map(|v| parse_bool("read-only", &v))
        .transpose()?;
    let open_backing = !matches!(o.take("backing").as_deref(), Some("null" | ""));
    for k in ["cache.direct", "cache.no-flush", "auto-read-only"] {
        if let Some(v) = o.get(k) {
            parse_bool(k, v)?;
        }
    }
    for k in IGNORED {
        o.take(k);
    }
    Ok(Resolved {
        path,
        format,
        read_only,
        open_backing,
        copy_on_read,
        driver_options: o,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_flatten_and_resolve() {
        let o = flatten_json(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"},"backing":null,"cache":{"direct":false}}"#,
        )
        .unwrap();
        assert_eq!(o.get("file.filename"), Some("t.qcow2"));
        assert_eq!(o.get("cache.direct"), Some("off"));
        let r = resolve(o, None, None).unwrap();
        assert_eq!(r.path, "t.qcow2");
        assert_eq!(r.format, Some(Format::Qcow2));
        assert!(!r.open_backing);
        assert!(r.driver_options.is_empty());
        let o =
            OptionList::parse("driver=qcow2,file.driver=host_device,file.filename=/dev/x").unwrap();
        let e = resolve(o, None, None).unwrap_err().to_string();
        assert!(e.contains("character or block device"), "{e}");
        assert!(flatten_json("json:[1]").is_err());
    }
}
