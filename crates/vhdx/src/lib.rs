//! The VHDX format (qemu name `vhdx`, MS-VHDX): dynamic, fixed and differencing images.
//!
//! - Open: file identifier, both headers (current = valid with the highest sequence
//!   number), region table, metadata (block size, sector sizes, virtual size, parent
//!   locator) and the BAT. A dirty log is replayed: written back on a read-write open,
//!   applied **in memory only** on a read-only open (the file is not modified; qemu
//!   refuses such opens).
//! - Read: every payload block state; partially present blocks of differencing images
//!   read per sector bitmap from the block or the parent (connected with
//!   [`BlockDevice::set_backing`]; the parent locator is reported in
//!   [`DeviceInfo::backing`](diskimg_blockio::DeviceInfo)); a VHDX parent must still
//!   carry the `DataWriteGuid` the child recorded in `parent_linkage` unless the driver
//!   option [`CHECK_PARENT_LINKAGE_OPTION`] is `off`).
//! - Write: new blocks at the 1 MiB aligned end of the file, data flushed before the BAT
//!   references it, and every metadata change (BAT, sector bitmaps) through the log.
//! - Create: `subformat=dynamic|fixed`, `block_size`, `log_size`, `block_state_zero`
//!   as qemu, and differencing images with `backing_file`.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
//!                       OptionList, Storage};
//!
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! let mut req = CreateRequest::new(64 << 20, OptionList::parse("block_size=1M")?);
//! diskimg_vhdx::DRIVER.create(storage.clone(), &mut req)?;
//! let dev = diskimg_vhdx::DRIVER.open(storage.clone(), &OpenOptions::new())?;
//! dev.write_at(&[0xab; 4096], 3 << 20)?;
//! dev.flush()?;
//! let mut buf = [0u8; 4096];
//! dev.read_at(&mut buf, 3 << 20)?;
//! assert_eq!(buf, [0xab; 4096]);
//! assert_eq!(dev.info().cluster_size, Some(1 << 20));
//! drop(dev);
//! // Read-only reopen sees the same data.
//! let ro = diskimg_vhdx::DRIVER.open(storage, &OpenOptions::new().read_only(true))?;
//! ro.read_at(&mut buf, 3 << 20)?;
//! assert_eq!(buf, [0xab; 4096]);
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, Driver, OpenOptions, Result, Storage,
};

mod bat;
mod check;
mod create;
mod device;
mod format;
mod header;
mod layout;
mod linkage;
mod log;
mod metadata;
mod ops;
mod options;
mod overlay;
mod resize;
mod write;

pub use device::VhdxDevice;
pub use linkage::CHECK_OPTION as CHECK_PARENT_LINKAGE_OPTION;
pub use options::VhdxCreateOptions;

/// The vhdx driver for the `diskimg` facade's table.
pub static DRIVER: VhdxDriver = VhdxDriver;

/// Probe, open and create for vhdx.
#[derive(Debug)]
pub struct VhdxDriver;

impl Driver for VhdxDriver {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    fn probe(&self, storage: &dyn Storage) -> u32 {
        if header::has_signature(storage) {
            100
        } else {
            0
        }
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(VhdxDevice::open(storage, options)?))
    }

    /// The size check, [`VhdxCreateOptions::take`] from `request.options`, then
    /// [`VhdxCreateOptions::create`].
    fn create(&self, storage: Arc<dyn Storage>, request: &mut CreateRequest) -> Result<()> {
        create::check_size(request.size)?;
        VhdxCreateOptions::take(&mut request.options)?.create(storage.as_ref(), request)
    }

    fn create_options(&self) -> &'static [CreateOptionSpec] {
        create::CREATE_OPTIONS
    }
}
