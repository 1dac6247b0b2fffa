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

use anyhow::{Result, anyhow};
use diskimg::OptionList;

/// The host path of a file name: without qemu's `file:` protocol prefix, behind `./`
/// when the rest would read as a protocol prefix (qemu's file driver names
/// `file:foo:bar` `./foo:bar`).
pub(crate) fn host_path(arg: &str) -> String {
    diskimg::file_protocol_path(arg).unwrap_or_else(|| arg.to_string())
}

/// Refuses an image name with a protocol prefix diskimg does not open
/// ([`diskimg::protocol_of`]): qemu's `Unknown protocol 'foo'` for `foo:bar`, where
/// diskimg would otherwise open or create a file of that name. `file:`, `json:` and
/// `blkdebug:` pass (their callers read them), and `http(s)://` URLs when `url_ok` (a
/// source a read-only verb opens).
pub(crate) fn check_protocol(name: &str, url_ok: bool) -> Result<()> {
    protocol_error(name, url_ok).map_or(Ok(()), |e| Err(e.into()))
}

/// Opens the host file `path` for the image argument `name`, unless `name` has a
/// protocol prefix diskimg does not open ([`check_protocol`], no URLs).
pub(crate) fn open_file(
    name: &str,
    path: &str,
    format: Option<diskimg::Format>,
    opts: &diskimg::ImageOptions,
) -> Result<diskimg::Image> {
    check_protocol(name, false)?;
    Ok(diskimg::open(path, format, opts)?)
}

/// The refusal [`check_protocol`] reports, as a library error.
pub(crate) fn protocol_error(name: &str, url_ok: bool) -> Option<diskimg::Error> {
    // An `--image-opts` option string names its file in `file.filename`.
    if crate::secrets::image_opts() && name.contains('=') {
        return None;
    }
    match diskimg::protocol_of(name) {
        None | Some("file" | "json" | "blkdebug") => None,
        Some(_) if url_ok && diskimg::stream::is_stream_spec(name) => None,
        Some(p) => Some(diskimg::protocol_refusal(p)),
    }
}

/// The name qemu's tools show for the image argument `arg` (`image_opts`: the argument is
/// an `--image-opts` option string).
pub(crate) fn shown(arg: &str, image_opts: bool) -> String {
    if let Some(path) = diskimg::file_protocol_path(arg) {
        return path;
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
            // The data file's node: qemu names the image by its file all the same.
            "data-file.driver" if v == "file" => {}
            "data-file.filename" => {}
            _ => return None,
        }
    }
    file
}

/// Flattens the object of a `json:{…}` file name into dotted keys
/// ([`diskimg::json_options`]).
pub(crate) fn flatten_json(name: &str) -> Result<OptionList> {
    diskimg::json_options(name).map_err(|e| anyhow!("{e}"))
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
    fn names_as_qemu_shows_them() {
        assert_eq!(host_path("file:a:b.qcow2"), "./a:b.qcow2");
        assert_eq!(host_path("file:d/a:b.qcow2"), "d/a:b.qcow2");
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
        assert!(check_protocol("foo:bar", true).is_err());
        assert!(check_protocol("http://h/x", false).is_err());
        assert!(check_protocol("http://h/x", true).is_ok());
        assert!(check_protocol("./foo:bar", false).is_ok());
        let debug = "json:{'driver':'qcow2','file':{'driver':'blkdebug','image':{'driver':'file','filename':'t'}}}";
        assert_eq!(shown(debug, false), debug);
    }
}
