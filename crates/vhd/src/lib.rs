//! VHD disk images (Virtual PC / Hyper-V; qemu's format name `vpc`).
//!
//! - [`DRIVER`] ([`VhdDriver`]): probe, open and create. Dynamic and differencing disks
//!   carry a footer copy at offset 0 (`conectix`, probe score 100); a fixed disk only at
//!   the end, so it is claimed with a lower score (60) when that footer's checksum is
//!   valid and it says "fixed" (qemu probes such files as raw).
//! - [`VhdDevice`]: the [`BlockDevice`]: fixed disks are read and written in place;
//!   dynamic disks allocate 2 MiB blocks (data, sector bitmap and a new footer written
//!   and flushed before the BAT entry points at the block); differencing disks read
//!   sectors whose bitmap bit is clear from the parent set with
//!   [`BlockDevice::set_backing`] (named by the W2ru/W2ku/MacX parent locators in
//!   [`DeviceInfo::backing`](diskimg_blockio::DeviceInfo)).
//! - Virtual size as qemu computes it: CHS geometry for creators `vpc `/`qemu`,
//!   current_size for `qem2`, `win `, `d2v `, `tap\0`, `CTXS`, `wa\0\0` or a maximal
//!   geometry; the runtime option `force_size_calc=chs|current_size` overrides.
//! - Create options: `subformat=dynamic|fixed`, `force_size`, `azure_align` (round the
//!   size up to 1 MiB and store it exactly, as Azure requires), `preallocation`,
//!   `backing_file`/`backing_fmt=vpc` (a differencing disk; see [`create_differencing`]).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
//!                       OptionList, Storage};
//!
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! let mut req = CreateRequest::new(64 << 20, OptionList::new());
//! diskimg_vhd::DRIVER.create(storage.clone(), &mut req)?;
//! let dev = diskimg_vhd::DRIVER.open(storage, &OpenOptions::new())?;
//! // qemu-img rounds 64 MiB up to a whole CHS geometry (964/8/17).
//! assert_eq!(dev.info().virtual_size, 67_125_248);
//! dev.write_at(&[0xab; 512], 4096)?;
//! let mut buf = [0u8; 512];
//! dev.read_at(&mut buf, 4096)?;
//! assert_eq!(buf, [0xab; 512]);
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

mod check;
mod create;
mod device;
pub mod footer;
pub mod header;
pub mod locator;
mod open;
mod options;
mod write;

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, Driver, OpenOptions, Result, Storage,
};

pub use create::{BLOCK_SIZE, create_differencing, create_differencing_in};
pub use device::VhdDevice;
pub use footer::FORMAT;
pub use options::VhdCreateOptions;

/// The vhd driver for the `diskimg` facade's table.
pub static DRIVER: VhdDriver = VhdDriver;

/// Probe, open and create for VHD images.
#[derive(Debug)]
pub struct VhdDriver;

static CREATE_OPTIONS: &[CreateOptionSpec] = &[
    CreateOptionSpec {
        name: "size",
        kind: "<size>",
        help: "Virtual disk size",
    },
    CreateOptionSpec {
        name: "subformat",
        kind: "<str>",
        help: "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    },
    CreateOptionSpec {
        name: "force_size",
        kind: "<bool (on/off)>",
        help: "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
    },
    CreateOptionSpec {
        name: "azure_align",
        kind: "<bool (on/off)>",
        help: "Round the virtual size up to a multiple of 1 MiB and store it exactly (implies force_size; Azure requires it, with subformat=fixed)",
    },
    CreateOptionSpec {
        name: "backing_file",
        kind: "<str>",
        help: "Parent VHD: creates a differencing disk (not in qemu)",
    },
    CreateOptionSpec {
        name: "backing_fmt",
        kind: "<str>",
        help: "Format of the parent (must be vpc)",
    },
];

impl Driver for VhdDriver {
    fn name(&self) -> &'static str {
        FORMAT
    }

    fn probe(&self, storage: &dyn Storage) -> u32 {
        open::probe(storage)
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(open::open(storage, options)?))
    }

    /// [`VhdCreateOptions::take`] from `request.options`, then
    /// [`VhdCreateOptions::create`].
    fn create(&self, storage: Arc<dyn Storage>, request: &mut CreateRequest) -> Result<()> {
        VhdCreateOptions::take(&mut request.options)?.create(storage.as_ref(), request)
    }

    fn create_options(&self) -> &'static [CreateOptionSpec] {
        CREATE_OPTIONS
    }
}
