//! The one error type shared by every diskimg crate.

use std::borrow::Cow;

/// Result alias used throughout diskimg.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong opening, reading, writing or creating an image.
///
/// Messages are specific: they say *what* was wrong and, for on-disk problems, *where*.
/// Match on the variant to decide how to react; display it to tell a person.
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
    /// The image contradicts its format's specification.
    #[error("{format} image is corrupt: {what} (at byte offset {offset:#x})")]
    Corrupt {
        /// Format name (`qcow2`, `vhdx`, …).
        format: &'static str,
        /// A static phrase naming the problem ("L2 table offset not cluster-aligned").
        what: &'static str,
        /// Host (file) offset of the offending structure or field.
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
    /// The caller passed a bad argument or option.
    #[error("{0}")]
    InvalidArgument(Cow<'static, str>),
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

    /// A corrupt-image error.
    pub fn corrupt(format: &'static str, what: &'static str, offset: u64) -> Self {
        Error::Corrupt {
            format,
            what,
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

    /// An invalid-argument error.
    pub fn invalid(msg: impl Into<Cow<'static, str>>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// True when this error means "not implemented / not possible for this format",
    /// which the CLI maps to qemu-img's "does not support" exit codes.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Error::Unsupported { .. })
    }
}

impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::io("I/O error", source)
    }
}
