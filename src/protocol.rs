//! qemu's protocol prefixes: a name whose first `/`-separated part holds a colon
//! (`foo:bar`, `nbd:host:10809`, `http://h/x`) names a protocol driver in qemu
//! (`path_has_protocol`, `bdrv_find_protocol` in `block.c`), never a file, even when a
//! file of that name exists; `./foo:bar`, an absolute path or `file:foo:bar` name the file.
//!
//! diskimg opens host files. The tools built on it also read `json:{…}` names,
//! `blkdebug:` names and, read-only, `http(s)://` URLs; every other prefix is refused
//! with qemu's words for one it does not know (`Unknown protocol 'foo'`) or, for one qemu
//! has a driver for, by saying diskimg has none — rather than opening or creating a
//! file of that name. [`OpenPolicy::qemu_compatible`](crate::OpenPolicy) applies the same
//! rule to backing file names stored in images: qemu does not resolve `foo:bar` against
//! the image's directory, it looks for a `foo` protocol.
//!
//! ```
//! assert_eq!(diskimg::protocol_of("foo:bar"), Some("foo"));
//! assert_eq!(diskimg::protocol_of("a:b/c"), Some("a"));
//! assert_eq!(diskimg::protocol_of("./foo:bar"), None);
//! assert_eq!(diskimg::protocol_of("/d/foo:bar"), None);
//! assert_eq!(
//!     diskimg::protocol_refusal("foo").to_string(),
//!     "Unknown protocol 'foo'"
//! );
//! ```

use diskimg_blockio::Error;

/// The protocol prefixes qemu 10.0 has drivers for (built in or as loadable modules:
/// curl, ssh, iscsi, gluster, nfs, rbd), besides `file` and the `json` pseudo-protocol.
const QEMU_PROTOCOLS: &[&str] = &[
    "host_device",
    "host_cdrom",
    "nbd",
    "nbd+tcp",
    "nbd+unix",
    "fat",
    "null-co",
    "null-aio",
    "blkdebug",
    "blkverify",
    "nvme",
    "http",
    "https",
    "ftp",
    "ftps",
    "ssh",
    "iscsi",
    "iser",
    "gluster",
    "gluster+tcp",
    "gluster+unix",
    "nfs",
    "rbd",
];

/// The protocol prefix of `name` (qemu's `path_has_protocol`: the text before a colon
/// that comes before the first `/`), or `None` for a file name.
pub fn protocol_of(name: &str) -> Option<&str> {
    let first = name.split('/').next()?;
    first.find(':').map(|i| &first[..i])
}

/// The file a `file:` name names, as qemu's file driver shows it: the rest of the name,
/// behind `./` when the rest would itself read as a protocol prefix (`file:foo:bar` names
/// `./foo:bar`); `None` for a name without the `file:` prefix.
pub fn file_protocol_path(name: &str) -> Option<String> {
    let rest = name.strip_prefix("file:")?;
    Some(match protocol_of(rest) {
        Some(_) => format!("./{rest}"),
        None => rest.to_string(),
    })
}

/// Why a name with protocol prefix `protocol` is not opened: qemu's
/// `Unknown protocol 'P'` for a prefix qemu has no driver for either, else that diskimg
/// has no driver for it. (`file` and `json` are not refused here: callers handle them.)
pub fn protocol_refusal(protocol: &str) -> Error {
    if QEMU_PROTOCOLS.contains(&protocol) {
        Error::invalid(format!("Protocol '{protocol}' is not supported by diskimg"))
    } else {
        Error::invalid(format!("Unknown protocol '{protocol}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_as_qemu_finds_them() {
        assert_eq!(protocol_of("foo:bar"), Some("foo"));
        assert_eq!(protocol_of(":bar"), Some(""));
        assert_eq!(protocol_of("nbd+unix:///x?socket=/s"), Some("nbd+unix"));
        assert_eq!(protocol_of("file:a:b"), Some("file"));
        assert_eq!(protocol_of("d/a:b"), None);
        assert_eq!(protocol_of("plain.qcow2"), None);
        assert_eq!(file_protocol_path("file:a:b").as_deref(), Some("./a:b"));
        assert_eq!(file_protocol_path("file:d/a:b").as_deref(), Some("d/a:b"));
        assert_eq!(file_protocol_path("a:b"), None);
        assert_eq!(protocol_of(""), None);
        assert!(
            protocol_refusal("nbd")
                .to_string()
                .contains("not supported")
        );
        assert_eq!(
            protocol_refusal("FOO").to_string(),
            "Unknown protocol 'FOO'"
        );
    }
}
