//! The core of diskimg: host bytes, the guest view, and the vocabulary every format shares.
//!
//! - [`Storage`]: the host bytes an image lives in ([`FileStorage`], [`MemStorage`],
//!   [`ReadOnlyStorage`], [`FaultStorage`] for crash tests, and on Linux `UringStorage`, a
//!   file on an io_uring). Positional, `&self`, `Send + Sync`. Wrappers pass the methods
//!   they leave alone on with [`forward_storage!`].
//! - [`AsyncDevice`]: the async face of any device, whose [`IoFuture`]s need no particular
//!   runtime (completed by an io_uring completion thread or a small worker pool).
//! - [`BlockDevice`]: the guest view of one image layer: read, write, write-zeroes,
//!   discard, flush and [`map`](BlockDevice::map) (what a range is: data at a host
//!   offset, zero, unallocated, compressed). Object-safe, `&self`, safe from many threads.
//!   Wrappers pass the methods they leave alone on with [`forward_device!`].
//! - Capabilities some formats add, reached through the device without downcasts:
//!   [`Snapshots`], [`Bitmaps`], [`Amend`], [`ChainLink`] ([`BlockDevice::as_snapshots`]
//!   and its siblings).
//! - [`Driver`]: probe, open and create for one format; the `diskimg` facade holds a
//!   table of them. Drivers reach other host files only through [`HostFiles`], a policy
//!   object that denies everything by default ([`DenyFiles`]).
//! - [`block_status`] / [`map_chain`] / [`map_chain_iter`]: qemu's `MapEntry` view across a
//!   backing chain (the iterator in constant memory).
//! - [`copy_range`]: host bytes from one storage to another with `copy_file_range` when
//!   both are files ([`BlockDevice::write_from`] and [`BlockDevice::data_storage`] build
//!   qemu-img's `convert -C` on it).
//! - [`MetaRanges`]: where an image's own metadata lies, to refuse overlapping layouts
//!   at open and data writes that would land on metadata.
//! - [`Error`], one enum for all; [`Limits`], bounds on what an image may make us allocate;
//!   [`bytes`], bounds-checked fields.
//!
//! # Example
//!
//! A trivial device over in-memory storage, then its map:
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, DeviceInfo, Extent, ExtentKind, MemStorage, Result,
//!                       Storage, check_range, map_all};
//!
//! #[derive(Debug)]
//! struct Flat(MemStorage);
//!
//! impl BlockDevice for Flat {
//!     fn info(&self) -> DeviceInfo { DeviceInfo::new("raw", self.0.len().unwrap()) }
//!     fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
//!         check_range(off, buf.len() as u64, self.virtual_size())?;
//!         self.0.read_exact_at(buf, off)
//!     }
//!     fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
//!         check_range(off, buf.len() as u64, self.virtual_size())?;
//!         self.0.write_all_at(buf, off)
//!     }
//!     fn flush(&self) -> Result<()> { self.0.flush() }
//!     fn map(&self, off: u64, len: u64) -> Result<Extent> {
//!         check_range(off, len, self.virtual_size())?;
//!         Ok(Extent { offset: off, len, kind: ExtentKind::Data { offset: Some(off) } })
//!     }
//!     fn as_any(&self) -> &dyn std::any::Any { self }
//! }
//!
//! let dev: Arc<dyn BlockDevice> = Arc::new(Flat(MemStorage::from_vec(vec![0; 4096])));
//! dev.write_at(b"hello", 100)?;
//! let mut buf = [0u8; 5];
//! dev.read_at(&mut buf, 100)?;
//! assert_eq!(&buf, b"hello");
//! assert_eq!(map_all(dev.as_ref(), 0, 4096)?.len(), 1);
//! assert!(dev.read_at(&mut buf, 4095).is_err());
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

mod aio;
pub mod bytes;
mod cache;
mod capability;
mod chain;
mod closed;
mod copy;
mod device;
mod driver;
mod epoch;
mod error;
mod events;
mod forward;
mod forward_device;
mod info;
mod layout;
mod limits;
pub mod lock;
mod meta;
mod options;
mod packed;
pub mod parent_path;
mod secrets;
mod storage;
pub mod vectored;
mod zero;

pub use aio::{AsyncDevice, IO_ALIGN, IoBuf, IoFuture, Plug, park_until};
pub use cache::CacheMode;
pub use capability::{Amend, BitmapData, BitmapInfo, BitmapOp, Bitmaps, ChainLink, Snapshots};
pub use chain::{MapChain, MapEntry, block_status, map_chain, map_chain_iter};
pub use closed::Closed;
pub use copy::copy_range;
pub use device::{
    BlockDevice, Extent, ExtentKind, Holes, ZeroFlags, check_range, map_all, map_host_run,
    read_from_backing, write_from_by_buffer,
};
pub use driver::{CreateRequest, DenyFiles, Driver, FilePurpose, HostFiles, OpenOptions};
pub use epoch::BackingEpoch;
pub use error::{Error, OrCorrupt, Result};
pub use events::{
    CorruptionReporter, FailureReporter, report_corruption, report_failure,
    set_corruption_reporter, set_failure_reporter,
};
pub use info::{BackingRef, CheckReport, DeviceInfo, InfoValue, RepairMode, SnapshotInfo};
pub use layout::{
    HostRun, Layout, Mapping, PastEof, RunFn, advance_mapping, for_each_run, guard_write, map_run,
    map_via, read_run, read_via, walk,
};
pub use limits::Limits;
pub use meta::{MetaRange, MetaRanges, Overlap};
pub use options::{CreateOptionSpec, FILE_CREATE_OPTIONS, OptionList, parse_size};
pub use packed::{CompressedUnits, PackedUnit, looks_incompressible};
pub use secrets::Secrets;
pub use storage::{
    CrashMode, DebugEvent, FaultStorage, FileStorage, MemStorage, Preallocation, ReadOnlyStorage,
    Storage, write_zeroes_by_buffer,
};
#[cfg(target_os = "linux")]
pub use storage::{PlainRead, RawBuf, Uring, UringStorage};
pub use zero::zero_by_buffer;
