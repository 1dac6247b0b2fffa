//! [`CacheMode`]: how an image file uses the host's page cache, qemu's `cache=` modes
//! (`qemu-img -t`/`-T`), applied by [`FileStorage::open_with`](crate::FileStorage::open_with).
//!
//! | mode | page cache | [`Storage::flush`](crate::Storage::flush) | each write |
//! |---|---|---|---|
//! | `writeback` (default) | used | `fdatasync` | returns once in the page cache |
//! | `none` | bypassed (`O_DIRECT`) | `fdatasync` (the device's cache) | returns once sent to the device |
//! | `unsafe` | used | does nothing | returns once in the page cache |
//! | `writethrough` | used | `fdatasync` | durable when it returns (`O_SYNC`) |
//! | `directsync` | bypassed (`O_DIRECT`) | `fdatasync` | durable when it returns (`O_SYNC`) |
//!
//! With `O_DIRECT` the kernel takes only aligned requests; `FileStorage` aligns them
//! itself (see `direct.rs`), so the formats above it need not care.

use crate::error::{Error, Result};

/// How host I/O to an image file uses the page cache (qemu's cache modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheMode {
    /// Through the page cache; flushes make writes durable (qemu's default for images).
    #[default]
    Writeback,
    /// `O_DIRECT`: the page cache is bypassed; flushes are still honoured.
    None,
    /// Through the page cache, and flushes do nothing: a crash may lose or tear
    /// anything written (qemu-img convert's default target mode).
    Unsafe,
    /// `O_DIRECT` and `O_SYNC`: every write is durable when it returns.
    DirectSync,
    /// `O_SYNC` through the page cache: every write is durable when it returns.
    Writethrough,
}

impl CacheMode {
    /// Parses qemu's names (`none` or `off`, `writeback`, `unsafe`, `directsync`,
    /// `writethrough`), failing with qemu's "Invalid cache option".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "writeback" => Ok(Self::Writeback),
            "none" | "off" => Ok(Self::None),
            "unsafe" => Ok(Self::Unsafe),
            "directsync" => Ok(Self::DirectSync),
            "writethrough" => Ok(Self::Writethrough),
            _ => Err(Error::invalid(format!("Invalid cache option: {s}"))),
        }
    }

    /// qemu's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writeback => "writeback",
            Self::None => "none",
            Self::Unsafe => "unsafe",
            Self::DirectSync => "directsync",
            Self::Writethrough => "writethrough",
        }
    }

    /// The page cache is bypassed (`O_DIRECT`): `none`, `directsync`.
    pub fn direct(self) -> bool {
        matches!(self, Self::None | Self::DirectSync)
    }

    /// Every write is durable when it returns: `writethrough`, `directsync`.
    pub fn write_through(self) -> bool {
        matches!(self, Self::Writethrough | Self::DirectSync)
    }

    /// Flushes do nothing: `unsafe`.
    pub fn ignores_flush(self) -> bool {
        self == Self::Unsafe
    }

    /// The `open(2)` flags a file needs in this mode (`O_DIRECT`; `O_SYNC` when it is
    /// opened for writing), for files opened elsewhere and handed to
    /// [`FileStorage::from_file_with`](crate::FileStorage::from_file_with).
    pub fn open_flags(self, read_only: bool) -> u32 {
        let mut flags = rustix::fs::OFlags::empty();
        if self.direct() {
            flags |= rustix::fs::OFlags::DIRECT;
        }
        if self.write_through() && !read_only {
            flags |= rustix::fs::OFlags::DSYNC;
        }
        flags.bits()
    }

    /// The error for a failed open of `path` in this mode: a file system that refuses
    /// `O_DIRECT` (`EINVAL`) is named as the reason, as qemu does.
    pub fn open_error(self, path: &std::path::Path, e: std::io::Error) -> Error {
        let why = if self.direct() && e.kind() == std::io::ErrorKind::InvalidInput {
            " (the file system does not support O_DIRECT)"
        } else {
            ""
        };
        Error::io(format!("could not open '{}'{why}", path.display()), e)
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in [
            CacheMode::Writeback,
            CacheMode::None,
            CacheMode::Unsafe,
            CacheMode::DirectSync,
            CacheMode::Writethrough,
        ] {
            assert_eq!(CacheMode::parse(m.as_str()).unwrap(), m);
            assert_eq!(m.to_string(), m.as_str());
        }
        assert_eq!(CacheMode::parse("off").unwrap(), CacheMode::None);
        assert_eq!(
            CacheMode::parse("bogus").unwrap_err().to_string(),
            "Invalid cache option: bogus"
        );
        assert!(CacheMode::None.direct() && !CacheMode::None.write_through());
        assert!(CacheMode::DirectSync.direct() && CacheMode::DirectSync.write_through());
        assert!(CacheMode::Writethrough.write_through() && !CacheMode::Writethrough.direct());
        assert!(CacheMode::Unsafe.ignores_flush() && !CacheMode::Writeback.ignores_flush());
        assert_eq!(CacheMode::default(), CacheMode::Writeback);
    }
}
