//! Image specifications beyond a plain file name: qemu's `json:{…}` pseudo-protocol,
//! flattened option dictionaries (`driver=qcow2,file.filename=F,backing=null`) and the
//! `blkdebug:` / `file:` prefixes, turned into what the CLI opens ([`Resolved`], opened by
//! [`open`]): a file with a format, a format nested on another format's guest bytes, or
//! qemu's `null-co` device.
//!
//! `file.locking` and `force-share` set how the files are locked (`docs/locking.md`).
//! Keys that only tune qemu's block layer (node names, cache modes, discard and
//! detect-zeroes settings) are accepted and ignored; `backing=null` (or `""`) opens
//! without the backing chain. `blkdebug` is a pass-through (qemu's tests wrap images in
//! it); its error-injection rules apply above a format in qemu-io and are refused
//! elsewhere. Protocol nodes are checked as
//! qemu's file driver checks them (`'file' driver requires 'X' to be a regular file`).

mod open;

use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use diskimg::{Format, OptionList};

use crate::io::blkdebug::{
    Engine, Limits as BlkdebugLimits, Rule as BlkdebugRule, config_rules, node_rules,
};

pub(crate) use crate::names::{flatten_json, parse_bool};
pub(crate) use open::{arg_cache, is_spec, is_spec_or_opts, open, open_arg};

/// What a specification opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// An image file (format given or probed).
    File,
    /// The format is opened on the guest bytes of `inner` in the file.
    Nested(Format),
    /// qemu's `null-co` device of this size.
    Null(u64),
    /// A `quorum` of these files, with this vote threshold.
    Quorum(Vec<String>, usize),
}

/// What a flattened option dictionary opens.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// The image file.
    pub(crate) path: String,
    /// The format (`driver`), when given.
    pub(crate) format: Option<Format>,
    /// File, nested format, or null device.
    pub(crate) node: Node,
    /// The protocol driver named for the file (`file`, `host_device`, `host_cdrom`).
    pub(crate) protocol: Option<String>,
    /// `read-only` from the options, when given.
    pub(crate) read_only: Option<bool>,
    /// False with `backing=null`.
    pub(crate) open_backing: bool,
    /// A `copy-on-read` filter was named above the format.
    pub(crate) copy_on_read: bool,
    /// A `compress` filter was named above the format (qemu-io applies it).
    pub(crate) compress: bool,
    /// `file.locking` (`on`/`auto`: true, `off`: false), when given.
    pub(crate) locking: Option<bool>,
    /// `force-share` from the options, when given.
    pub(crate) force_share: Option<bool>,
    /// The remaining keys, for the format driver (and `backing.` for the chain).
    pub(crate) driver_options: OptionList,
    /// Error-injection rules of a `blkdebug` node above the format (qemu-io applies
    /// them; see [`crate::io::blkdebug`]).
    pub(crate) blkdebug: Vec<BlkdebugRule>,
    /// Request limits of that blkdebug node (how zero writes are split).
    pub(crate) blkdebug_limits: BlkdebugLimits,
    /// The rules of a blkdebug node below the format (the image file's storage).
    pub(crate) file_debug: Option<Arc<Engine>>,
    /// That node's request alignment (`file.align`; 0: none).
    pub(crate) file_align: u64,
    /// The rules of a blkdebug node below the external data file.
    pub(crate) data_debug: Option<Arc<Engine>>,
    /// The raw format's `offset` and `size` options: a window into the file.
    pub(crate) raw_window: Option<(u64, Option<u64>)>,
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
    "locking",
    "file.aio",
    "file.aio-max-batch",
    "auto-read-only",
];

/// Removes every key of `o` under `prefix.` (and `prefix` itself).
fn drop_subtree(o: &mut OptionList, prefix: &str) {
    let p = format!("{prefix}.");
    let keys: Vec<String> = o
        .entries()
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| k == prefix || k.starts_with(&p))
        .collect();
    for k in keys {
        o.take(&k);
    }
}

/// The image and rules of a `blkdebug:CONFIG:FILE` name.
fn blkdebug_name(name: &str) -> Result<(String, Vec<BlkdebugRule>)> {
    let rest = name.strip_prefix("blkdebug:").unwrap_or(name);
    let Some((config, file)) = rest.split_once(':') else {
        bail!("Invalid blkdebug file name: {name}");
    };
    Ok((file.to_string(), config_rules(config)?))
}

/// Keys of a blkdebug node that set its request limits (see [`BlkdebugLimits`]).
const BLKDEBUG_LIMITS: &[&str] = &[
    "align",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
];

/// Resolves a `blkdebug` node's options (`o` relative to it; `name` a file name given
/// beside them, qemu's `x-image`) to its image's file name and its rules.
fn blkdebug_node(o: &OptionList, name: Option<&str>) -> Result<(String, Vec<BlkdebugRule>)> {
    let mut rules = node_rules(o)?;
    // The image: a file, or a format on a file (`image.file.filename`).
    let file = o
        .get("image.filename")
        .or_else(|| o.get("image.file.filename"));
    let (path, more) = match (file, o.get("image"), name) {
        (Some(f), _, _) | (None, Some(f), _) => (f.to_string(), Vec::new()),
        (None, None, Some(n)) if n.starts_with("blkdebug:") => blkdebug_name(n)?,
        (None, None, Some(n)) => (n.to_string(), Vec::new()),
        (None, None, None) => bail!("Parameter 'image' is missing"),
    };
    rules.extend(more);
    Ok((path, rules))
}

/// The rule engine of a blkdebug node below a format: its events are the format
/// driver's own and its offsets the file's ([`BlkdebugStorage`]).
fn below_format(rules: Vec<BlkdebugRule>) -> Option<Arc<Engine>> {
    Some(Arc::new(Engine::new(rules)))
}

/// A blkdebug node below the image's external data file (`data-file.file.driver=
/// blkdebug` over a raw node, or `data-file.driver=blkdebug`): its engine; the
/// `data-file` keys are taken. Other `data-file` options are left to the driver.
fn data_file_node(o: &mut OptionList) -> Result<Option<Arc<Engine>>> {
    let d = o.subtree("data-file");
    let node = match (d.get("driver"), d.get("file.driver")) {
        (Some("blkdebug"), _) => d,
        (Some("raw") | None, Some("blkdebug")) => d.subtree("file"),
        _ => return Ok(None),
    };
    let (_, rules) = blkdebug_node(&node, None)?;
    drop_subtree(o, "data-file");
    Ok(below_format(rules))
}

/// Takes the raw format's `offset`/`size` options (qemu's "raw" driver).
fn raw_window(o: &mut OptionList) -> Result<Option<(u64, Option<u64>)>> {
    let num = |k: &str, v: Option<String>| -> Result<Option<u64>> {
        v.map(|v| {
            diskimg::parse_size(&v)
                .map_err(|_| anyhow!("Parameter '{k}' expects a non-negative number below 2^64"))
        })
        .transpose()
    };
    let offset = num("offset", o.take("offset"))?;
    let size = num("size", o.take("size"))?;
    Ok((offset.is_some() || size.is_some()).then(|| (offset.unwrap_or(0), size)))
}

/// The children and vote threshold of a `quorum` node (`o` relative to it).
fn quorum_node(o: &OptionList) -> Result<Node> {
    let threshold = o
        .get("vote-threshold")
        .ok_or_else(|| anyhow!("Parameter 'vote-threshold' is missing"))?;
    let threshold: usize = threshold
        .parse()
        .map_err(|_| anyhow!("Parameter 'vote-threshold' expects a number"))?;
    let mut children = Vec::new();
    for i in 0.. {
        let c = o.subtree(&format!("children.{i}"));
        if c.is_empty() {
            break;
        }
        match (c.get("driver"), c.get("filename")) {
            (Some("file") | None, Some(f)) => children.push(f.to_string()),
            (Some(d), _) => {
                bail!("quorum child driver '{d}' is not supported by diskimg (only 'file')")
            }
            (None, None) => bail!("A block device must be specified for \"children.{i}\""),
        }
    }
    if threshold < 1 || threshold > children.len() {
        bail!("threshold may not exceed children count");
    }
    Ok(Node::Quorum(children, threshold))
}

fn format_named(d: &str) -> Result<Format> {
    Format::from_name(d).map_err(|_| anyhow!("Unknown driver '{d}'"))
}

/// Resolves a dictionary; `name` is a plain file name given beside it (qemu-io's
/// `open -o OPTS FILE`), `format` the `-f` format.
pub(crate) fn resolve(
    o: OptionList,
    name: Option<&str>,
    format: Option<Format>,
) -> Result<Resolved> {
    let (mut o, copy_on_read, compress) = below_filters(o);
    let mut r = node_options(&mut o, format, copy_on_read, compress)?;
    let driver = o.take("driver");
    let file_driver = o.get("file.driver").map(str::to_string);
    if format_driver(&mut r, &mut o, driver.as_deref(), name)? {
        return Ok(r);
    }
    if driver.as_deref() == Some("raw") {
        r.raw_window = raw_window(&mut o)?;
    }
    // The limits of a blkdebug node below the format (`file.align`, …).
    let file_limits = BlkdebugLimits::from_options(&o.subtree("file"))?;
    if r.path.is_empty() {
        r.path = file_child(&mut r, &o, file_driver.as_deref(), name)?;
        drop_subtree(&mut o, "file");
    }
    // A `file:` prefix of a file name (in options, `filename` is the file's name as is).
    if r.path.starts_with("file:") && name == Some(r.path.as_str()) {
        r.path = crate::names::host_path(&r.path);
    } else if r.path.starts_with("blkdebug:") {
        let (path, rules) = blkdebug_name(&r.path)?;
        r.file_debug = below_format(rules);
        r.path = path;
    }
    if r.file_debug.is_some() {
        r.file_align = file_limits.align();
    }
    r.data_debug = data_file_node(&mut o)?;
    for k in IGNORED {
        o.take(k);
    }
    r.driver_options = o;
    Ok(r)
}

/// The options below the filters named above the format (the format node is their
/// `file` child), and whether `copy-on-read` and `compress` were among them.
fn below_filters(mut o: OptionList) -> (OptionList, bool, bool) {
    let (mut copy_on_read, mut compress) = (false, false);
    loop {
        match o.get("driver") {
            Some("copy-on-read") => copy_on_read = true,
            Some("compress") => compress = true,
            _ => break,
        }
        o = o.subtree("file");
    }
    (o, copy_on_read, compress)
}

/// A [`Resolved`] with the node's generic options taken from `o` (read-only, backing,
/// locking, force-share; the cache switches checked), its file not yet known.
fn node_options(
    o: &mut OptionList,
    format: Option<Format>,
    copy_on_read: bool,
    compress: bool,
) -> Result<Resolved> {
    let r = Resolved {
        path: String::new(),
        format,
        node: Node::File,
        protocol: None,
        read_only: o
            .take("read-only")
            .map(|v| parse_bool("read-only", &v))
            .transpose()?,
        open_backing: !matches!(o.take("backing").as_deref(), Some("null" | "")),
        copy_on_read,
        compress,
        locking: match o.take("file.locking").as_deref() {
            None => None,
            Some("on" | "auto") => Some(true),
            Some("off") => Some(false),
            Some(v) => bail!("invalid parameter value: {v}"),
        },
        force_share: o
            .take("force-share")
            .map(|v| parse_bool("force-share", &v))
            .transpose()?,
        driver_options: OptionList::new(),
        blkdebug: Vec::new(),
        blkdebug_limits: BlkdebugLimits::default(),
        file_debug: None,
        file_align: 0,
        data_debug: None,
        raw_window: None,
    };
    for k in ["cache.direct", "cache.no-flush", "auto-read-only"] {
        if let Some(v) = o.get(k) {
            parse_bool(k, v)?;
        }
    }
    Ok(r)
}

/// Applies the top node's `driver` to `r`: a format, a protocol (opened as raw), a
/// `blkdebug` node or a null device. True when that settles everything (null device).
fn format_driver(
    r: &mut Resolved,
    o: &mut OptionList,
    driver: Option<&str>,
    name: Option<&str>,
) -> Result<bool> {
    match driver {
        Some("null-co" | "null-aio") => {
            let size = o.take("size").unwrap_or_else(|| "1073741824".into());
            let size = diskimg::parse_size(&size).map_err(|e| anyhow!("{e}"))?;
            r.node = Node::Null(size);
            // Named, never probed (no raw probing warning).
            r.format = Some(Format::Raw);
            r.path = "null-co://".into();
            return Ok(true);
        }
        Some(p @ ("file" | "host_device" | "host_cdrom")) => {
            r.protocol = Some(p.to_string());
            r.format = Some(Format::Raw);
            r.path = o
                .take("filename")
                .or_else(|| name.map(str::to_string))
                .ok_or_else(|| anyhow!("Parameter 'filename' is required"))?;
        }
        Some("blkdebug") => {
            let (path, rules) = blkdebug_node(o, name)?;
            r.path = path;
            r.blkdebug = rules;
            r.blkdebug_limits = BlkdebugLimits::from_options(o)?;
            // Over a protocol node (or an image opened as raw) blkdebug is over the
            // file's bytes.
            r.format = match o.get("image.driver") {
                Some(d) if !matches!(d, "file" | "host_device" | "host_cdrom") => {
                    Some(format_named(d)?)
                }
                _ => Some(Format::Raw),
            };
            for k in BLKDEBUG_LIMITS.iter().chain(&["config"]) {
                o.take(k);
            }
            drop_subtree(o, "image");
            drop_subtree(o, "inject-error");
            drop_subtree(o, "set-state");
        }
        Some(d) => r.format = Some(format_named(d)?),
        None => {}
    }
    Ok(false)
}

/// The file of the format node, from its `file` child (`file.driver` = `file_driver`):
/// a path, a nested format's file, a blkdebug node's image or a quorum (in `r.node`).
fn file_child(
    r: &mut Resolved,
    o: &OptionList,
    file_driver: Option<&str>,
    name: Option<&str>,
) -> Result<String> {
    Ok(match file_driver {
        Some("blkdebug") => {
            let (path, rules) = blkdebug_node(&o.subtree("file"), None)?;
            r.file_debug = below_format(rules);
            path
        }
        Some("null-co" | "null-aio") => bail!("diskimg opens a format only on a file"),
        Some("quorum") => {
            r.node = quorum_node(&o.subtree("file"))?;
            String::new()
        }
        Some(f) if f != "file" && Format::from_name(f).is_ok() => {
            r.node = Node::Nested(format_named(f)?);
            let inner = o.subtree("file");
            match (inner.get("file.filename"), inner.get("file")) {
                (Some(p), _) | (None, Some(p)) => p.to_string(),
                (None, None) => bail!("A block device must be specified for \"file\""),
            }
        }
        Some(p @ ("host_device" | "host_cdrom")) => {
            r.protocol = Some(p.to_string());
            o.get("file.filename").unwrap_or("").to_string()
        }
        Some(p) if p != "file" => {
            bail!("Unknown protocol '{p}' (diskimg supports only 'file')")
        }
        _ => match (o.get("file.filename"), o.get("file"), name) {
            (Some(p), None, None) | (None, Some(p), None) | (None, None, Some(p)) => p.to_string(),
            (None, None, None) => bail!("A block device must be specified for \"file\""),
            _ => {
                bail!("Cannot specify both 'file' and 'file.filename', or a file name with either")
            }
        },
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
        let o = flatten_json("json:{ 'driver': 'null-co', 'size': 4096, 'read-zeroes': true }")
            .unwrap();
        assert_eq!(resolve(o, None, None).unwrap().node, Node::Null(4096));
        let o = flatten_json(
            r#"json:{"driver":"qcow2","file":{"driver":"qcow2","file":{"filename":"in.qcow2"}}}"#,
        )
        .unwrap();
        let r = resolve(o, None, None).unwrap();
        assert_eq!(
            (r.path.as_str(), r.node),
            ("in.qcow2", Node::Nested(Format::Qcow2))
        );
        let o = OptionList::parse("driver=qcow2,file.align=4k").unwrap();
        let r = resolve(o, Some("blkdebug::t.qcow2"), None).unwrap();
        assert_eq!(r.path, "t.qcow2");
        assert!(r.driver_options.is_empty());
        // blkdebug above a protocol node (iotest iov-padding) or a format (iotest 197).
        let o =
            OptionList::parse("driver=blkdebug,align=4096,image.driver=file,image.filename=t.raw")
                .unwrap();
        let r = resolve(o, None, None).unwrap();
        assert_eq!((r.path.as_str(), r.format), ("t.raw", Some(Format::Raw)));
        assert!(r.driver_options.is_empty() && r.blkdebug.is_empty());
        let o =
            OptionList::parse("driver=blkdebug,image.driver=qcow2,inject-error.0.event=cor_write")
                .unwrap();
        let r = resolve(o, Some("w.qcow2"), None).unwrap();
        assert_eq!(
            (r.path.as_str(), r.format),
            ("w.qcow2", Some(Format::Qcow2))
        );
        assert_eq!(r.blkdebug.len(), 1);
        assert!(r.driver_options.is_empty());
        assert!(flatten_json("json:[1]").is_err());
    }
}
