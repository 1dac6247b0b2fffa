//! The one error type shared by every diskimg crate, and the taxonomy behind it.
//!
//! See [`Error`] for what each variant means.

use std::borrow::Cow;

/// Result alias used throughout diskimg.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong opening, reading, writing or creating an image.
///
/// Messages are specific: they say *what* was wrong and, for on-disk problems, *where*.
/// Match on the variant to decide how to react; display it to tell a person.
///
/// Each variant answers "whose fault is it?", so a caller can react without reading
/// messages:
///
/// | variant | meaning | typical reaction |
/// |---|---|---|
/// | [`Error::Io`] | the host storage failed | retry, report the OS error |
/// | [`Error::NotThisFormat`] | the bytes are not an image of the format asked for (bad magic) | probe again, or open as another format |
/// | [`Error::Corrupt`] | the image claims to be the format but contradicts its specification | refuse the image, run `check`, report the offset |
/// | [`Error::Unsupported`] | valid image or request that diskimg does not implement | fall back, convert elsewhere |
/// | [`Error::LimitExceeded`] | the image would need more memory or depth than [`crate::Limits`] allow | raise the limit if the image is trusted |
/// | [`Error::InvalidArgument`] | the caller asked for something impossible (bad option, size, name) | fix the call |
/// | [`Error::OutOfRange`] | a guest access past the end of the disk | fix the call |
/// | [`Error::Internal`] | a broken invariant inside diskimg: a bug, never the image's or the caller's fault | report it |
///
/// The remaining variants ([`Error::BackingDenied`], [`Error::BackingLoop`],
/// [`Error::ReadOnly`], [`Error::Locked`], [`Error::Closed`], [`Error::Key`]) name one
/// situation each.
///
/// An image error displays as its bare message (`what`, qemu's words where qemu has
/// them, which the CLI prints unchanged); the format and the offset are fields, and
/// [`Error::located`] spells all three out for a log line.
///
/// Format crates build errors through the constructors ([`Error::corrupt`],
/// [`Error::not_format`], [`Error::internal`], [`Error::invalid`]) or, for an `Option` from a
/// bounds-checked parse, through [`OrCorrupt`]. Messages are the words a person reads
/// (often qemu's own, which the CLI prints unchanged); the variant and the offset are
/// what programs match on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The host storage failed.
    #[error("{context}: {source}")]
    Io {
        /// What diskimg was doing.
        context: Cow<'static, str>,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The image contradicts its format's specification: a field out of range, a table
    /// pointing outside the file, a checksum that does not match, a structure cut short.
    #[error("{what}")]
    Corrupt {
        /// Format name (`qcow2`, `vhdx`, …).
        format: &'static str,
        /// What was found ("L2 table offset not cluster-aligned", "Invalid block size 3").
        what: Cow<'static, str>,
        /// Host (file) offset of the offending structure or field, when there is one
        /// (a descriptor line or a relation between two fields may have none).
        offset: Option<u64>,
    },
    /// The bytes are not an image of this format at all: its magic or signature is
    /// missing. Probing answers this before opening; an explicit `-f` meets it.
    #[error("{what}")]
    NotThisFormat {
        /// The format that was asked for.
        format: &'static str,
        /// What was found instead ("Image not in VDI format", "invalid VPC image").
        what: Cow<'static, str>,
        /// Host offset of the magic that did not match.
        offset: u64,
    },
    /// The image is valid but uses something diskimg does not implement (or refuses).
    #[error("{format}: unsupported: {what}")]
    Unsupported {
        /// Format name.
        format: &'static str,
        /// What is unsupported.
        what: Cow<'static, str>,
    },
    /// A size from the image would need more memory or depth than [`crate::Limits`] allow.
    #[error("{what} needs {requested} but the limit is {limit}")]
    LimitExceeded {
        /// What was being sized.
        what: &'static str,
        /// What the image asked for.
        requested: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A guest access outside the virtual disk.
    #[error("access at offset {offset} length {len} is beyond the end of the {size}-byte disk")]
    OutOfRange {
        /// Guest byte offset.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// The caller passed a bad argument or option. Never used for bad image contents.
    #[error("{0}")]
    InvalidArgument(Cow<'static, str>),
    /// A broken invariant inside diskimg (an index the code computed itself out of
    /// range, a worker thread gone): a bug to report, not a problem with the image or
    /// the call.
    #[error("internal error: {0}")]
    Internal(Cow<'static, str>),
    /// Opening another host file (backing, data file, extent) was refused by the policy.
    #[error("refusing to open '{path}' ({purpose}): {reason}")]
    BackingDenied {
        /// The path the image named.
        path: String,
        /// Why the image wants it (backing file, data file, extent).
        purpose: &'static str,
        /// Which rule refused it.
        reason: &'static str,
    },
    /// A backing chain that names an image already in it (qemu's words).
    #[error("Backing file '{path}' creates an infinite loop.")]
    BackingLoop {
        /// The backing file as the image named it.
        path: String,
    },
    /// A write to a read-only device or storage.
    #[error("the image is opened read-only")]
    ReadOnly,
    /// Another process (qemu, or another diskimg) uses the file in a way that conflicts
    /// with this open; the message is qemu's (see [`crate::lock`]).
    #[error("{what}\nIs another process using the image [{path}]?")]
    Locked {
        /// qemu's words: `Failed to get "write" lock`, `Failed to get shared "write" lock`.
        what: Cow<'static, str>,
        /// The file, as it was named.
        path: String,
    },
    /// An I/O request after [`close`](crate::BlockDevice::close).
    #[error("the image was closed")]
    Closed,
    /// The image is encrypted and no (or a wrong) key was given.
    #[error("{0}")]
    Key(Cow<'static, str>),
}

impl Error {
    /// Wraps an I/O error with what diskimg was doing.
    pub fn io(context: impl Into<Cow<'static, str>>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A corrupt-image error at host offset `offset` of the image file.
    pub fn corrupt(format: &'static str, what: impl Into<Cow<'static, str>>, offset: u64) -> Self {
        Error::Corrupt {
            format,
            what: what.into(),
            offset: Some(offset),
        }
    }

    /// A corrupt-image error with no single offending offset (a relation between
    /// fields, a line of a text descriptor).
    pub fn corrupt_unplaced(format: &'static str, what: impl Into<Cow<'static, str>>) -> Self {
        Error::Corrupt {
            format,
            what: what.into(),
            offset: None,
        }
    }

    /// The bytes at `offset` are not `format`'s magic: not an image of this format.
    pub fn not_format(
        format: &'static str,
        what: impl Into<Cow<'static, str>>,
        offset: u64,
    ) -> Self {
        Error::NotThisFormat {
            format,
            what: what.into(),
            offset,
        }
    }

    /// An unsupported-feature error.
    pub fn unsupported(format: &'static str, what: impl Into<Cow<'static, str>>) -> Self {
        Error::Unsupported {
            format,
            what: what.into(),
        }
    }

    /// An invalid-argument error: the caller's request is wrong. For bad image contents
    /// use [`Error::corrupt`]; for "cannot happen" use [`Error::internal`].
    pub fn invalid(msg: impl Into<Cow<'static, str>>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// A broken internal invariant (a bug in diskimg).
    pub fn internal(what: impl Into<Cow<'static, str>>) -> Self {
        Error::Internal(what.into())
    }

    /// True when this error means "not implemented / not possible for this format",
    /// which the CLI maps to qemu-img's "does not support" exit codes.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Error::Unsupported { .. })
    }

    /// The same error again, for state that failed once and fails every later call the
    /// same way (a forward-only walk, a broken stream): same variant, words, format and
    /// offset; an I/O error keeps its kind, OS error code and text.
    pub fn replay(&self) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(n) => std::io::Error::from_raw_os_error(n),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::Corrupt {
                format,
                what,
                offset,
            } => Error::Corrupt {
                format,
                what: what.clone(),
                offset: *offset,
            },
            Error::NotThisFormat {
                format,
                what,
                offset,
            } => Error::NotThisFormat {
                format,
                what: what.clone(),
                offset: *offset,
            },
            Error::Unsupported { format, what } => Error::Unsupported {
                format,
                what: what.clone(),
            },
            Error::LimitExceeded {
                what,
                requested,
                limit,
            } => Error::LimitExceeded {
                what,
                requested: *requested,
                limit: *limit,
            },
            Error::OutOfRange { offset, len, size } => Error::OutOfRange {
                offset: *offset,
                len: *len,
                size: *size,
            },
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::Internal(m) => Error::Internal(m.clone()),
            Error::BackingDenied {
                path,
                purpose,
                reason,
            } => Error::BackingDenied {
                path: path.clone(),
                purpose,
                reason,
            },
            Error::BackingLoop { path } => Error::BackingLoop { path: path.clone() },
            Error::ReadOnly => Error::ReadOnly,
            Error::Locked { what, path } => Error::Locked {
                what: what.clone(),
                path: path.clone(),
            },
            Error::Closed => Error::Closed,
            Error::Key(m) => Error::Key(m.clone()),
        }
    }

    /// True for a damaged image ([`Error::Corrupt`]) or one of another format
    /// ([`Error::NotThisFormat`]): the image's fault, not the caller's or the host's.
    pub fn is_bad_image(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::NotThisFormat { .. })
    }

    /// The message with, for an image error, its format and offset:
    /// `vdi image is corrupt: header truncated (at byte offset 0x40)`. Other errors
    /// read as their [`Display`](std::fmt::Display).
    pub fn located(&self) -> String {
        let at = |o: Option<u64>| {
            o.map(|o| format!(" (at byte offset {o:#x})"))
                .unwrap_or_default()
        };
        match self {
            Error::Corrupt {
                format,
                what,
                offset,
            } => format!("{format} image is corrupt: {what}{}", at(*offset)),
            Error::NotThisFormat {
                format,
                what,
                offset,
            } => format!("not a {format} image: {what}{}", at(Some(*offset))),
            e => e.to_string(),
        }
    }

    /// The host offset an image error points at, if it has one.
    pub fn image_offset(&self) -> Option<u64> {
        match self {
            Error::Corrupt { offset, .. } => *offset,
            Error::NotThisFormat { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::io("I/O error", source)
    }
}

/// Turns a failed bounds-checked parse (`None`) into the right error in one call,
/// the way gimli-rs/object's `read_error` does:
/// `hdr.le_u32(8).or_corrupt("vdi", "header cut short", 8)?`.
pub trait OrCorrupt<T> {
    /// `None` becomes [`Error::Corrupt`] for `format` at host offset `offset`.
    fn or_corrupt(self, format: &'static str, what: &'static str, offset: u64) -> Result<T>;
    /// `None` becomes [`Error::Internal`]: the value was computed by diskimg itself, so
    /// its absence is a bug.
    fn or_internal(self, what: &'static str) -> Result<T>;
}

impl<T> OrCorrupt<T> for Option<T> {
    fn or_corrupt(self, format: &'static str, what: &'static str, offset: u64) -> Result<T> {
        self.ok_or_else(|| Error::corrupt(format, what, offset))
    }
    fn or_internal(self, what: &'static str) -> Result<T> {
        self.ok_or_else(|| Error::internal(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_names_format_and_offset_when_known() {
        let e = Error::corrupt("vdi", "bad block size", 0x180);
        assert_eq!(e.to_string(), "bad block size");
        assert_eq!(
            e.located(),
            "vdi image is corrupt: bad block size (at byte offset 0x180)"
        );
        assert_eq!(e.image_offset(), Some(0x180));
        let e = Error::corrupt_unplaced("vmdk", format!("extent {} missing", 2));
        assert_eq!(e.located(), "vmdk image is corrupt: extent 2 missing");
        assert_eq!(e.image_offset(), None);
        assert!(e.is_bad_image());
    }

    #[test]
    fn not_format_internal_and_option_helpers() {
        let e = Error::not_format("vpc", "invalid VPC image", 0);
        assert!(e.is_bad_image());
        assert_eq!(e.image_offset(), Some(0));
        assert!(!Error::invalid("bad size").is_bad_image());
        let e = None::<u32>.or_corrupt("vhdx", "region table cut short", 0x3_0000);
        assert!(matches!(
            e,
            Err(Error::Corrupt {
                offset: Some(0x3_0000),
                ..
            })
        ));
        let e = None::<u32>.or_internal("write range");
        assert_eq!(e.unwrap_err().to_string(), "internal error: write range");
        assert_eq!(Some(3).or_internal("x").ok(), Some(3));
    }

    #[test]
    fn replay_keeps_variant_words_and_offset() {
        let e = Error::corrupt("vmdk", "bad marker", 0x200).replay();
        assert!(matches!(
            e,
            Error::Corrupt {
                offset: Some(0x200),
                ..
            }
        ));
        assert_eq!(e.to_string(), "bad marker");
        let io = Error::io("reading 'x'", std::io::Error::from_raw_os_error(5)).replay();
        assert!(
            matches!(&io, Error::Io { source, .. } if source.raw_os_error() == Some(5)),
            "{io:?}"
        );
        let other = Error::io("'x'", std::io::Error::other("connection reset")).replay();
        assert_eq!(other.to_string(), "'x': connection reset");
        let lp = Error::BackingLoop {
            path: "a.qcow2".into(),
        }
        .replay();
        assert_eq!(
            lp.to_string(),
            "Backing file 'a.qcow2' creates an infinite loop."
        );
    }
}
