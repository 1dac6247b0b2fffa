//! qemu-compatible image locks on the files an [`open`](crate::open) reaches (see
//! [`diskimg_blockio::lock`] for the bytes and rules): the image file, its backing files,
//! and the data files and extents its format names, each locked as qemu locks it.

use std::sync::{Arc, Mutex};

use diskimg_blockio::lock::LockPerms;
use diskimg_blockio::{Error, FileStorage, Result};

use crate::Format;

/// How files are locked: `None` when locking is off (`ImageOptions::locking` false).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LockMode {
    /// Let others write while we read (`-U`, `force-share=on`; read-only opens only).
    pub force_share: bool,
}

impl LockMode {
    /// The lock mode of `options`, refusing force-share on a writable open (qemu's
    /// words).
    pub(crate) fn of(locking: bool, force_share: bool, read_only: bool) -> Result<Option<Self>> {
        if force_share && !read_only {
            return Err(Error::invalid(
                "force-share=on can only be used with read-only images",
            ));
        }
        Ok(locking.then_some(Self { force_share }))
    }

    /// The permissions a file of `format` opened `writable` takes: raw images as a raw
    /// file, everything else as a format driver's storage (image file, data file, extent).
    pub(crate) fn perms(self, format: Option<Format>, writable: bool) -> LockPerms {
        let share = self.force_share && !writable;
        match format {
            Some(Format::Raw) => LockPerms::raw_file(writable, share),
            _ => LockPerms::format_file(writable, share),
        }
    }
}

/// The storages whose locks an image holds, released by [`crate::Image::close`] (and
/// by dropping the last handle to each file).
#[derive(Clone, Debug, Default)]
pub(crate) struct HeldLocks(Arc<Mutex<Vec<Arc<FileStorage>>>>);

impl HeldLocks {
    /// Locks `fs` (named `name` in errors) and remembers it.
    pub(crate) fn lock(&self, fs: &Arc<FileStorage>, perms: LockPerms, name: &str) -> Result<()> {
        fs.lock(perms, name)?;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fs.clone());
        Ok(())
    }

    /// Releases every lock taken through this set.
    pub(crate) fn release(&self) {
        for fs in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            fs.unlock();
        }
    }
}
