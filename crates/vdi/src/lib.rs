//! The VDI (VirtualBox Disk Image) format, qemu name `vdi`.
//!
//! - [`DRIVER`] probes (signature `0xbeda107f` at byte 64), opens version 1.1 images
//!   (what qemu and VirtualBox write) and version 1.0 images (which qemu refuses), and
//!   creates dynamic or static (`static=on`) version 1.1 images exactly as
//!   `qemu-img create -f vdi` lays them out.
//! - [`VdiDevice`] is the [`BlockDevice`]: reads, in-place writes with block allocation
//!   (1 MiB blocks appended, data flushed before the block map entry and the header's
//!   allocated count are written together in one write), write-zeroes that leave
//!   unallocated blocks alone, `map`, qemu's `check`, and `resize` (grow only; qemu
//!   cannot resize VDI, VirtualBox can).
//! - [`VdiCreateOptions`]: the create options, typed (`static`, `preallocation`), with
//!   the adapter from qemu's `-o` strings the driver uses.
//! - [`Uuid`]: the image, modification, link and parent UUIDs in VirtualBox's byte order;
//!   new images get random ones, and the modification UUID is renewed on the first write
//!   of each session, as VirtualBox does.
//!
//! Differencing images (non-nil link or parent UUID) are refused with qemu's message, as
//! are block sizes other than 1 MiB and non-zero per-block extra data.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
//!                       OptionList, RepairMode, Storage};
//!
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! let mut req = CreateRequest::new(8 << 20, OptionList::new());
//! diskimg_vdi::DRIVER.create(storage.clone(), &mut req)?;
//! assert_eq!(diskimg_vdi::DRIVER.probe(storage.as_ref()), 100);
//!
//! let dev = diskimg_vdi::DRIVER.open(storage.clone(), &OpenOptions::new())?;
//! dev.write_at(&[0xab; 4096], 3 << 20)?;
//! dev.flush()?;
//! let mut buf = [0u8; 4096];
//! dev.read_at(&mut buf, 3 << 20)?;
//! assert_eq!(buf, [0xab; 4096]);
//! assert_eq!(dev.info().cluster_size, Some(1 << 20));
//! assert_eq!(dev.check(RepairMode::None)?.corruptions, 0);
//! // One 1 MiB block was allocated after the 512-byte header and 512-byte block map.
//! assert_eq!(storage.len()?, 1024 + (1 << 20));
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

use std::sync::Arc;

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, Driver, OpenOptions, Result, Storage,
};

mod bmap;
mod check;
mod create;
mod device;
mod header;
mod options;
mod resize;
mod uuid;

pub use device::VdiDevice;
pub use options::VdiCreateOptions;
pub use uuid::Uuid;

/// The vdi driver for the `diskimg` facade's table.
pub static DRIVER: VdiDriver = VdiDriver;

/// Probe, open and create for vdi.
#[derive(Debug)]
pub struct VdiDriver;

impl Driver for VdiDriver {
    fn name(&self) -> &'static str {
        "vdi"
    }

    /// 100 when the pre-header signature matches and the file holds a whole header
    /// sector (qemu's rule).
    fn probe(&self, storage: &dyn Storage) -> u32 {
        let mut buf = [0u8; header::HEADER_SECTOR];
        if storage.read_exact_at(&mut buf, 0).is_err() {
            return 0;
        }
        match buf.le_u32(64) {
            Some(header::SIGNATURE) => 100,
            _ => 0,
        }
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(VdiDevice::open(
            storage,
            options.read_only,
            options.limits,
        )?))
    }

    /// [`VdiCreateOptions::take`] from `request.options` (and a `size` left there), then
    /// [`VdiCreateOptions::create`].
    fn create(&self, storage: Arc<dyn Storage>, request: &mut CreateRequest) -> Result<()> {
        let opts = VdiCreateOptions::take(&mut request.options)?;
        if let Some(size) = request.options.take_size("size")? {
            request.size = size;
        }
        opts.create(storage, request)
    }

    fn create_options(&self) -> &'static [CreateOptionSpec] {
        create::CREATE_OPTIONS
    }
}
