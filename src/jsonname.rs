//! `json:{…}` file names: qemu's pseudo-protocol that spells a node graph as JSON
//! ([`json_options`] flattens it into dotted option keys), and backing files named so
//! ([`backing_node`]): the format on a file, on a `raw` node with `offset`/`size` (a
//! window of the file: writes past it fail with `ENOSPC`, as qemu's raw driver), or on
//! filter nodes the caller implements ([`NodeDrivers`]: the CLI's `blkdebug`). The file
//! a name reaches is opened only as the open policy allows it (relative names are taken
//! against the image's directory; qemu takes them against its working directory).

use std::sync::Arc;

use diskimg_blockio::{Error, OptionList, Result, Storage};
use serde_json::Value;

use crate::format::Format;

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
/// `qdict_flatten`: `{"file":{"filename":"x"}}` → `file.filename=x`; booleans as
/// `on`/`off`, arrays as `key.0`, `key.1`, …). Single-quoted strings are taken as qemu's
/// JSON parser takes them.
pub fn json_options(name: &str) -> Result<OptionList> {
    let text = name.strip_prefix("json:").unwrap_or(name);
    // What qemu's parser refuses is refused in its words, the rest by serde_json's.
    let why = |why: String| Error::invalid(format!("Could not parse the JSON options: {why}"));
    if let Some(qemu) = crate::jsonerr::qemu_words(text) {
        return Err(why(qemu));
    }
    let v: Value = serde_json::from_str(&double_quotes(text)).map_err(|e| why(e.to_string()))?;
    let Value::Object(_) = v else {
        return Err(Error::invalid("Invalid JSON object given"));
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

/// Makes the storage of a filter node from the storage of its child.
pub type WrapStorage = Arc<dyn Fn(Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync>;

/// A filter node below a format, opened by a [`NodeDriver`].
pub struct FilterNode {
    /// The key of its child node in its options (`image` for blkdebug).
    pub child: String,
    /// Wraps the child's storage.
    pub wrap: WrapStorage,
}

/// Opens a filter node of one driver from its options (relative to the node).
pub type NodeDriver = Arc<dyn Fn(&OptionList) -> Result<FilterNode> + Send + Sync>;

/// Filter drivers the caller implements, by name, for nodes inside `json:` backing names
/// ([`crate::ImageOptions::node_drivers`]).
#[derive(Clone, Default)]
pub struct NodeDrivers(pub Vec<(String, NodeDriver)>);

impl std::fmt::Debug for NodeDrivers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_tuple("NodeDrivers").field(&names).finish()
    }
}

/// What a `json:` backing name opens.
pub(crate) struct BackingNode {
    /// The format (`driver`), when named.
    pub(crate) format: Option<Format>,
    /// The host file.
    pub(crate) path: String,
    /// The nodes between the format and the file, innermost first.
    pub(crate) wraps: Vec<WrapStorage>,
    /// The format's other options.
    pub(crate) driver_options: OptionList,
}

impl std::fmt::Debug for BackingNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackingNode")
            .field("format", &self.format)
            .field("path", &self.path)
            .field("nodes", &self.wraps.len())
            .finish()
    }
}

impl BackingNode {
    /// The storage the format reads: `file` under the nodes of the name.
    pub(crate) fn wrap(&self, file: Arc<dyn Storage>) -> Arc<dyn Storage> {
        self.wraps.iter().fold(file, |s, w| w(s))
    }
}

/// Resolves the backing name `name` (`json:{…}`) with the filter `drivers` the caller has.
pub(crate) fn backing_node(name: &str, drivers: &NodeDrivers) -> Result<BackingNode> {
    let o = json_options(name)?;
    let format = match o.get("driver") {
        Some("file") | None => None,
        Some(d) => Some(Format::from_name(d).map_err(|_| unknown(d))?),
    };
    let mut wraps = Vec::new();
    let path = match (o.get("driver"), o.get("file")) {
        (Some("file"), _) => file_name(&o)?,
        (_, Some(f)) => f.to_string(),
        _ => file_node(&o.subtree("file"), drivers, &mut wraps, 0)?,
    };
    let mut driver_options = OptionList::new();
    for (k, v) in o.entries() {
        let generic = matches!(k.as_str(), "driver" | "file" | "filename" | "node-name");
        if !generic && !k.starts_with("file.") {
            driver_options.set(k, v);
        }
    }
    wraps.reverse();
    Ok(BackingNode {
        format,
        path,
        wraps,
        driver_options,
    })
}

fn unknown(driver: &str) -> Error {
    Error::invalid(format!("Unknown driver '{driver}'"))
}

fn file_name(o: &OptionList) -> Result<String> {
    o.get("filename")
        .map(str::to_string)
        .ok_or_else(|| Error::invalid("The 'file' block driver requires a file name"))
}

/// The host file below node `o`; the nodes on the way are pushed to `wraps`, outermost
/// first.
fn file_node(
    o: &OptionList,
    drivers: &NodeDrivers,
    wraps: &mut Vec<WrapStorage>,
    depth: usize,
) -> Result<String> {
    if depth > 8 {
        return Err(Error::invalid("json: name nests too many nodes"));
    }
    match o.get("driver") {
        None | Some("file") => file_name(o),
        Some("raw") => {
            let mut o = o.clone();
            let offset = o.take_size("offset")?.unwrap_or(0);
            let size = o.take_size("size")?;
            wraps.push(Arc::new(move |s| {
                Arc::new(WindowStorage::new(s, offset, size))
            }));
            match o.get("file") {
                Some(f) => Ok(f.to_string()),
                None => file_node(&o.subtree("file"), drivers, wraps, depth + 1),
            }
        }
        Some(d) => {
            let (_, open) = (drivers.0.iter())
                .find(|(n, _)| n == d)
                .ok_or_else(|| unknown(d))?;
            let node = open(o)?;
            wraps.push(node.wrap);
            match o.get(&node.child) {
                Some(f) => Ok(f.to_string()),
                None => file_node(&o.subtree(&node.child), drivers, wraps, depth + 1),
            }
        }
    }
}

/// qemu's `raw` driver with `offset`/`size`: a window of its file. Reads past the window
/// fail with `EINVAL`, writes with `ENOSPC` (`raw_adjust_offset`).
#[derive(Debug)]
pub(crate) struct WindowStorage {
    inner: Arc<dyn Storage>,
    offset: u64,
    size: Option<u64>,
}

impl WindowStorage {
    pub(crate) fn new(inner: Arc<dyn Storage>, offset: u64, size: Option<u64>) -> Self {
        Self {
            inner,
            offset,
            size,
        }
    }

    /// The file offset of a request of `len` bytes at `at`, or `errno` past the window.
    fn place(&self, at: u64, len: u64, errno: i32) -> Result<u64> {
        if let Some(size) = self.size
            && (at > size || len > size - at)
        {
            return Err(Error::io(
                "request past the raw node's size",
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        at.checked_add(self.offset)
            .ok_or_else(|| Error::invalid("offset past 2^64"))
    }
}

const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;

impl Storage for WindowStorage {
    diskimg_blockio::forward_storage!(inner: flush, is_read_only, debug_event);
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.place(offset, buf.len() as u64, EINVAL)?;
        self.inner.read_exact_at(buf, at)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let at = self.place(offset, buf.len() as u64, ENOSPC)?;
        self.inner.write_all_at(buf, at)
    }
    fn len(&self) -> Result<u64> {
        let file = self.inner.len()?.saturating_sub(self.offset);
        Ok(self.size.unwrap_or(file))
    }
    fn set_len(&self, len: u64) -> Result<()> {
        match self.size {
            Some(size) if len <= size => Ok(()),
            Some(_) => Err(Error::io(
                "the raw node has a fixed size",
                std::io::Error::from_raw_os_error(ENOSPC),
            )),
            None => self.inner.set_len(len.saturating_add(self.offset)),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let at = self.place(offset, len, ENOSPC)?;
        self.inner.write_zeroes(at, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let at = self.place(offset, len, ENOSPC)?;
        self.inner.discard(at, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg_blockio::MemStorage;

    #[test]
    fn single_quotes_become_json_strings() {
        assert_eq!(
            double_quotes(r#"{'a': 'x"y', "b": 'it\'s'}"#),
            r#"{"a": "x\"y", "b": "it's"}"#
        );
    }

    #[test]
    fn backing_names_resolve_through_raw_and_filter_nodes() {
        let drivers = NodeDrivers(vec![(
            "blkdebug".to_string(),
            Arc::new(|_: &OptionList| {
                Ok(FilterNode {
                    child: "image".into(),
                    wrap: Arc::new(|s| s),
                })
            }) as NodeDriver,
        )]);
        let n = backing_node(
            "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'inject-error': [{'event': 'write_aio'}], 'image': {'driver': 'file', 'filename': '/x/b.qcow2'}}}",
            &drivers,
        )
        .unwrap();
        assert_eq!(
            (n.format, n.path.as_str()),
            (Some(Format::Qcow2), "/x/b.qcow2")
        );
        assert_eq!(n.wraps.len(), 1);
        assert!(n.driver_options.is_empty());
        let raw = r#"json:{"driver": "qcow2", "file": {"driver": "raw", "size": 4096, "file": {"driver": "file", "filename": "b"}}}"#;
        let n = backing_node(raw, &NodeDrivers::default()).unwrap();
        assert_eq!(n.path, "b");
        let mem = Arc::new(MemStorage::new());
        let s = n.wrap(mem.clone());
        s.write_all_at(&[1; 4096], 0).unwrap();
        let e = s.write_all_at(&[1; 512], 4096).unwrap_err();
        assert!(e.to_string().contains("No space left on device"), "{e}");
        assert_eq!(s.len().unwrap(), 4096);
        let refused = "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'image': 'b'}}";
        let e = backing_node(refused, &NodeDrivers::default())
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "Unknown driver 'blkdebug'");
    }
}
