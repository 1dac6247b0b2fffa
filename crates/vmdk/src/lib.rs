//! The VMDK format (qemu name `vmdk`): VMware virtual disks in every layout qemu knows.
//!
//! - Read: text descriptors (embedded in a sparse file or a separate file), extent types
//!   SPARSE (hosted `KDMV` versions 1–3), FLAT, ZERO, VMFS, VMFSSPARSE (`COWD`),
//!   stream-optimized (deflated grains with markers, grain directory via the footer),
//!   multi-file twoGbMaxExtentSparse/Flat, delta disks (`parentFileNameHint`, with the
//!   parent's CID checked in [`BlockDevice::set_backing`]).
//! - Write and create: monolithicSparse (default), monolithicFlat, twoGbMaxExtentSparse,
//!   twoGbMaxExtentFlat, streamOptimized (via [`BlockDevice::write_compressed`]);
//!   options `adapter_type`, `hwversion`, `compat6`, `zeroed_grain`, `toolsversion`,
//!   `backing_file`. `check` as qemu's.
//! - Extent files are opened and created only through the [`HostFiles`] policy of
//!   [`OpenOptions`] / [`CreateRequest`]; this crate never touches the file system.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
//!                       OptionList, Storage};
//!
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! let mut req = CreateRequest::new(4 << 20, OptionList::new()).image_name("disk.vmdk");
//! diskimg_vmdk::DRIVER.create(storage.clone(), &mut req)?;
//! assert!(diskimg_vmdk::DRIVER.probe(storage.as_ref()) > 0);
//! let dev = diskimg_vmdk::DRIVER.open(storage, &OpenOptions::new())?;
//! dev.write_at(&[0xab; 512], 65536 + 512)?;
//! let mut buf = [0u8; 512];
//! dev.read_at(&mut buf, 65536 + 512)?;
//! assert_eq!(buf, [0xab; 512]);
//! assert_eq!(dev.info().cluster_size, Some(65536));
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```
//!
//! [`HostFiles`]: diskimg_blockio::HostFiles

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, Driver, OpenOptions, Result, Storage,
};

mod cid;
mod create;
mod descriptor;
mod device;
mod header;
mod layout;
mod open;
mod options;
mod sesparse;
mod sparse;
mod stream_read;
mod streaming;

pub use device::VmdkDevice;
pub use options::{AdapterType, Subformat, VmdkCreateOptions};
pub use stream_read::{ForwardStreamDevice, is_forward_stream};
pub use streaming::{OVERHEAD, STREAM_GRAIN, StreamProfile, StreamWriter, grain_record};

/// The vmdk driver for the `diskimg` facade's table.
pub static DRIVER: VmdkDriver = VmdkDriver;

/// Probe, open and create for vmdk.
#[derive(Debug)]
pub struct VmdkDriver;

impl Driver for VmdkDriver {
    fn name(&self) -> &'static str {
        "vmdk"
    }

    fn probe(&self, storage: &dyn Storage) -> u32 {
        let mut head = [0u8; 1024];
        let n = storage
            .len()
            .ok()
            .and_then(|l| usize::try_from(l.min(1024)).ok())
            .unwrap_or(0);
        let Some(buf) = head.get_mut(..n) else {
            return 0;
        };
        if storage.read_exact_at(buf, 0).is_err() {
            return 0;
        }
        if buf.get(0..4) == Some(b"KDMV".as_slice()) || buf.get(0..4) == Some(b"COWD".as_slice()) {
            return 100;
        }
        if descriptor::looks_like_descriptor(buf) {
            return 100;
        }
        0
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(open::open(storage, options)?))
    }

    /// [`VmdkCreateOptions::take`] from `request.options`, then
    /// [`VmdkCreateOptions::create`].
    fn create(&self, storage: Arc<dyn Storage>, request: &mut CreateRequest) -> Result<()> {
        VmdkCreateOptions::take(&mut request.options)?.create(storage, request)
    }

    fn create_options(&self) -> &'static [CreateOptionSpec] {
        create::CREATE_OPTIONS
    }
}

/// Parses descriptor text the way [`DRIVER`] does when opening (for fuzzing): returns
/// the number of extent lines, or the error an open would give.
pub fn parse_descriptor(text: &str) -> Result<usize> {
    descriptor::Descriptor::parse(text, true).map(|d| d.extents.len())
}
