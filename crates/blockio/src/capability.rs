//! Capabilities some formats have beyond the [`BlockDevice`] contract: internal snapshots,
//! persistent dirty bitmaps, option amendment and backing-link maintenance.
//!
//! Each capability is a small object-safe trait. A device that has one returns itself
//! from the matching accessor on [`BlockDevice`] ([`BlockDevice::as_snapshots`],
//! [`BlockDevice::as_bitmaps`], [`BlockDevice::as_amend`],
//! [`BlockDevice::as_chain_link`]); the defaults return `None`. Callers ask the device,
//! never its concrete type, so the facade and the CLI need no downcast and no dependency
//! on a format crate:
//!
//! ```
//! # use diskimg_blockio::{BlockDevice, Error, Result};
//! fn take_snapshot(dev: &dyn BlockDevice, name: &str) -> Result<String> {
//!     match dev.as_snapshots() {
//!         Some(s) => s.create(name),
//!         None => Err(Error::unsupported(dev.info().format, "internal snapshots")),
//!     }
//! }
//! ```

use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::Result;
use crate::options::OptionList;
use crate::secrets::Secrets;

/// Internal snapshots (`qemu-img snapshot`; qcow2). The list itself is in
/// [`DeviceInfo::snapshots`](crate::DeviceInfo::snapshots).
pub trait Snapshots: Send + Sync {
    /// Takes a snapshot of the current disk named `name`; returns its new id.
    fn create(&self, name: &str) -> Result<String>;
    /// Reverts the disk to snapshot `id_or_name` (ids are matched first, then names).
    fn apply(&self, id_or_name: &str) -> Result<()>;
    /// Deletes snapshot `id_or_name` (ids are matched first, then names).
    fn delete(&self, id_or_name: &str) -> Result<()>;
    /// A read-only device showing the disk as it was when snapshot `id_or_name` was
    /// taken; it shares this device's backing device.
    fn open(&self, id_or_name: &str) -> Result<Arc<dyn BlockDevice>>;
    /// Reads `buf.len()` bytes at `pos` of the VM state area (qemu's `bdrv_load_vmstate`;
    /// qemu-io `read -b`): the saved RAM and devices of a running VM, stored in the image
    /// next to the disk. Formats without one: `Unsupported`.
    fn load_vmstate(&self, _buf: &mut [u8], _pos: u64) -> Result<()> {
        Err(crate::Error::unsupported("image", "VM state"))
    }
    /// Writes `buf` at `pos` of the VM state area (qemu's `bdrv_save_vmstate`; qemu-io
    /// `write -b`), see [`Snapshots::load_vmstate`].
    fn save_vmstate(&self, _buf: &[u8], _pos: u64) -> Result<()> {
        Err(crate::Error::unsupported("image", "VM state"))
    }
}

/// One persistent dirty bitmap (qcow2 spec "Bitmap directory"), as `qemu-img info`
/// lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Bitmap name.
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Flag `in-use`: the bitmap may be inconsistent (not saved after a write).
    pub in_use: bool,
    /// Flag `auto`: the bitmap tracks writes (enabled).
    pub auto: bool,
}

/// The bits of one persistent bitmap (see [`Bitmaps::read`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapData {
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Bit `i` of byte `k` covers granule `8k + i`.
    pub bits: Vec<u8>,
}

/// One `qemu-img bitmap` operation on the bitmap it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapOp {
    /// `--add [-g GRANULARITY]`: a new empty bitmap; `enabled` unless `--disable` too.
    Add {
        /// Bytes per bit (default: the cluster size).
        granularity: Option<u64>,
        /// Set the "auto" flag (the bitmap tracks writes).
        enabled: bool,
    },
    /// `--remove`.
    Remove,
    /// `--clear`: every bit zero.
    Clear,
    /// `--enable`.
    Enable,
    /// `--disable`.
    Disable,
    /// `--merge SOURCE`: set every bit set in bitmap SOURCE of the same image.
    Merge(String),
    /// `--merge SOURCE -b FILE`: set every bit set in these bits (as
    /// [`Bitmaps::read`] returns them from another image) of this granularity.
    MergeBits {
        /// Bytes per bit of `bits`.
        granularity: u64,
        /// The source bitmap data.
        bits: Vec<u8>,
    },
}

impl BitmapOp {
    /// qemu-img's name for the operation in messages (`add`, `remove`, …, `merge`).
    pub fn verb(&self) -> &'static str {
        match self {
            BitmapOp::Add { .. } => "add",
            BitmapOp::Remove => "remove",
            BitmapOp::Clear => "clear",
            BitmapOp::Enable => "enable",
            BitmapOp::Disable => "disable",
            BitmapOp::Merge(_) | BitmapOp::MergeBits { .. } => "merge",
        }
    }
}

/// Persistent dirty bitmaps an image can hold (qcow2 v3). Editing them is an offline
/// operation on the image file (the facade's `maint::edit_bitmaps`), since an open
/// device tracks writes in the enabled ones.
pub trait Bitmaps: Send + Sync {
    /// The bitmaps the image holds.
    fn list(&self) -> Vec<BitmapInfo>;
    /// The bits of bitmap `name` as the open image sees them: on a read-write device
    /// the bits held in memory, including what its writes set since the open (as
    /// qemu's block layer and `qemu-nbd -B` show them); otherwise the stored bits.
    fn read(&self, name: &str) -> Result<BitmapData>;
}

/// Changing options of an existing image (`qemu-img amend -o`).
pub trait Amend: Send + Sync {
    /// Refuses, before anything changes, the options this format cannot amend at all
    /// (qemu fails those while parsing the option list).
    fn check_options(&self, options: &OptionList) -> Result<()>;
    /// Applies `options`; `secrets` holds the passphrases key-slot options name by id.
    fn amend(&self, options: &OptionList, secrets: &Secrets) -> Result<()>;
    /// [`Amend::amend`] with qemu-img amend's `--force` (`force`): changes that can lose
    /// data (overwriting an active encryption key slot, erasing the last ones) are
    /// allowed. The default ignores `force` (formats with nothing to force).
    fn amend_forced(&self, options: &OptionList, secrets: &Secrets, force: bool) -> Result<()> {
        let _ = force;
        self.amend(options, secrets)
    }
    /// [`Amend::amend_forced`] reporting progress as `progress(done, total)` in work
    /// units of the format's choosing (qemu's amend status callback: qemu-img prints
    /// `100 * done / total`; the total may grow, so the percentage can step back). The
    /// default reports nothing.
    fn amend_with_progress(
        &self,
        options: &OptionList,
        secrets: &Secrets,
        force: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let _ = progress;
        self.amend_forced(options, secrets, force)
    }
}

/// Maintenance of the link between an image and its backing image (`qemu-img rebase -u`
/// and `commit`).
pub trait ChainLink: Send + Sync {
    /// Rewrites the backing reference: `name` (`None`: no backing image) of `format`,
    /// without touching data (`rebase -u`).
    fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()>;
    /// Drops every cluster of this layer so that it reads through to its backing image
    /// again (what `commit` does to the top image unless `-d`).
    fn make_empty(&self) -> Result<()>;
    /// After a commit copied this image's data into its backing image `parent`, records
    /// the parent's new state where the format links the two by it (a VHDX child's
    /// `parent_linkage`), so that the image stays openable over `parent`. A no-op where
    /// the format keeps no such link.
    fn relink_parent(&self, parent: &dyn BlockDevice) -> Result<()>;
}
