//! The qcow2 disk image format (qemu name `qcow2`), versions 2 and 3.
//!
//! - [`DRIVER`] probes, opens and creates images with every `qemu-img create -o` option,
//!   including encryption ([`Qcow2Driver`]).
//! - [`Qcow2Device`] is the [`BlockDevice`]: reads of every cluster kind qemu writes
//!   (normal, zero, compressed with zlib or zstd, extended L2 subclusters, external data
//!   files), backing images through [`BlockDevice::set_backing`], crash-consistent
//!   writes (copy-on-write, zero flags, discard, compressed clusters), `check` with
//!   refcount repair, and internal snapshots: read-only views
//!   ([`Qcow2Device::open_snapshot`], or the driver options `snapshot.id=`/`snapshot.name=`),
//!   [`Qcow2Device::create_snapshot`], [`Qcow2Device::delete_snapshot`] and
//!   [`Qcow2Device::apply_snapshot`].
//! - Maintenance (what `qemu-img` verbs need): `check` repair with qemu's refcount rebuild,
//!   [`Qcow2Device::set_backing_file`] (rebase), [`Qcow2Device::make_empty`] (commit),
//!   [`Qcow2Device::amend`] (compat, lazy_refcounts, size), [`MeasureTarget`] (measure)
//!   and [`edit_bitmaps`] (persistent bitmaps: add, remove, clear, enable, disable).
//!
//! - Typed options: [`Qcow2CreateOptions`] (a builder of every create option, with
//!   [`Qcow2CreateOptions::take`] the one adapter from qemu-img's `-o` strings that
//!   create, measure and amend share) and [`Qcow2OpenOptions`] (the driver options
//!   `check`, `x-bitmap-edit`, `encrypt.*`, `snapshot.*` as fields;
//!   [`Qcow2Device::open_with`]).
//!
//! - Persistent dirty bitmaps track guest writes while the image is open read-write
//!   (marked `in_use` on disk, stored on [`Qcow2Device::close`] or drop), as in qemu.
//!
//! # Encryption
//!
//! LUKS (`encrypt.format=luks`, qemu's default cipher aes-256-xts-plain64 and every
//! aes-128/192/256 × xts/cbc/ecb × plain/plain64/essiv combination) and legacy qcow2 AES
//! (`encrypt.format=aes` or `encryption=on`; insecure, for compatibility only) are read,
//! written and created. As in qemu, the passphrase is a *secret* named by id: put the bytes
//! into [`diskimg_blockio::Secrets`] (`OpenOptions::secrets` / `CreateRequest::secrets`) and
//! name the id with the driver option (open) or create option (create)
//! [`KEY_SECRET_OPTION`] (`encrypt.key-secret`). A wrong passphrase fails the open with
//! `Error::Key("Invalid password, cannot unlock any keyslot")` before anything is
//! written. `map` reports encrypted data without host offsets, as qemu does. Compressed
//! writes and preallocation are refused on encrypted images. LUKS key slots are managed
//! with [`Qcow2Device::amend_encryption`] (qemu-img amend's `encrypt.*` options).
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
//!                       OptionList, Secrets, Storage};
//!
//! let secrets = Secrets::new().with("sec0", "correct horse battery staple");
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! let opts = OptionList::parse("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10")?;
//! let mut req = CreateRequest::new(1 << 20, opts).secrets(secrets.clone());
//! diskimg_qcow2::DRIVER.create(storage.clone(), &mut req)?;
//! let open = OpenOptions::new()
//!     .secrets(secrets)
//!     .driver_option(diskimg_qcow2::KEY_SECRET_OPTION, "sec0");
//! let dev = diskimg_qcow2::DRIVER.open(storage.clone(), &open)?;
//! dev.write_at(&[0xab; 512], 4096)?;
//! let mut buf = [0u8; 512];
//! dev.read_at(&mut buf, 4096)?;
//! assert_eq!(buf, [0xab; 512]);
//! assert!(dev.info().encrypted);
//! // Without the right passphrase the image does not open.
//! let wrong = OpenOptions::new()
//!     .secrets(Secrets::new().with("sec0", "wrong"))
//!     .driver_option(diskimg_qcow2::KEY_SECRET_OPTION, "sec0");
//! assert!(diskimg_qcow2::DRIVER.open(storage, &wrong).is_err());
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, ExtentKind, MemStorage,
//!                       OpenOptions, OptionList, Storage};
//!
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! let mut req = CreateRequest::new(16 << 20, OptionList::parse("cluster_size=4k")?);
//! diskimg_qcow2::DRIVER.create(storage.clone(), &mut req)?;
//! let dev = diskimg_qcow2::DRIVER.open(storage, &OpenOptions::new())?;
//! dev.write_at(&[0xab; 512], 8192)?;
//! let mut buf = [0u8; 512];
//! dev.read_at(&mut buf, 8192)?;
//! assert_eq!(buf, [0xab; 512]);
//! assert!(matches!(dev.map(8192, 4096)?.kind, ExtentKind::Data { .. }));
//! assert_eq!(dev.map(0, 4096)?.kind, ExtentKind::Unallocated { offset: None });
//! assert_eq!(dev.check(Default::default())?.corruptions, 0);
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

/// The LUKS1 and AES building blocks qcow2 encryption uses (the `diskimg-luks` crate).
pub use diskimg_luks as crypto;

use std::sync::Arc;

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, Driver, OpenOptions, Result, Storage,
};

mod behind;
mod blockdev;
mod capability;
mod compressed_write;
mod create;
mod device;
mod disk;
mod encryption;
mod engine;
mod errors;
mod ext_alloc;
mod features;
mod invalid_entry;
mod offload;
mod open;
mod open_options;
mod overwrite;
mod overwrite_vectored;
mod read;
mod runtime_options;
mod tracked;
mod write;
mod zero;

pub use create::measure::{MeasureTarget, Measurement, bitmaps_size};
pub use create::options::{Compat, CompressionType, EncryptOptions, Qcow2CreateOptions};
pub use device::Qcow2Device;
pub use diskimg_blockio::{BitmapInfo, BitmapOp};
pub use features::bitmap::read_bitmap;
pub use features::bitmap_edit::{edit_bitmaps, edit_bitmaps_then_close};
pub use open_options::{KEY_SECRET_OPTION, NO_IO_OPTION, Qcow2OpenOptions};

/// The qcow2 driver for the `diskimg` facade's table.
pub static DRIVER: Qcow2Driver = Qcow2Driver;

/// Probe, open and create for qcow2.
///
/// Open honours `OpenOptions::read_only`, `limits` (L2 and refcount caches are sized
/// from `max_cache_bytes`), `files` (for the external data file), `secrets` and the
/// driver options `snapshot.id=ID` / `snapshot.name=NAME`, which open a read-only view of
/// that internal snapshot, `encrypt.key-secret=ID` (the secret holding an encrypted
/// image's passphrase) and `encrypt.no-io=on` (open an encrypted image without a key for
/// metadata only, as `qemu-img info` does).
#[derive(Debug)]
pub struct Qcow2Driver;

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, storage: &dyn Storage) -> u32 {
        let mut b = [0u8; 8];
        if storage.read_exact_at(&mut b, 0).is_err() {
            return 0;
        }
        match (b.be_u32(0), b.be_u32(4)) {
            (Some(disk::header::MAGIC), Some(2 | 3)) => 100,
            _ => 0,
        }
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(Qcow2Device::open(storage, options)?))
    }

    /// [`Qcow2CreateOptions::take`] from `request.options` (a `size` there is dropped:
    /// `request.size` is the size), then [`Qcow2CreateOptions::create`].
    fn create(&self, storage: Arc<dyn Storage>, request: &mut CreateRequest) -> Result<()> {
        request.options.take("size");
        Qcow2CreateOptions::take(&mut request.options)?.create(storage, request)
    }

    fn create_options(&self) -> &'static [CreateOptionSpec] {
        create::CREATE_OPTIONS
    }
}
