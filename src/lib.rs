//! diskimg: open, probe, create and chain virtual-machine disk images.
//!
//! This facade ties the format crates together:
//! - [`Format`] names the formats (qemu's names) and [`probe`] guesses one from the
//!   bytes (raw is the fallback, never a probe hit);
//! - [`open`] opens an image file and, as the [`OpenPolicy`] allows, its backing chain,
//!   data files and extents (the library default denies every other file);
//! - [`create`] makes a new image with qemu's `key=value` options;
//! - [`Image`] holds the opened chain for `info --backing-chain`-style walks.
//!
//! The devices are [`BlockDevice`]s: `Send + Sync`, positional `&self` I/O.
//!
//! # Example
//!
//! ```
//! use diskimg::{create, open, Format, ImageOptions, OptionList};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.img");
//! create(&path, Format::Raw, Some(1 << 20), OptionList::new(), &ImageOptions::default())?;
//! let img = open(&path, None, &ImageOptions::default())?;
//! assert_eq!(img.format, Format::Raw);
//! img.device.write_at(b"boot", 0)?;
//! let mut buf = [0u8; 4];
//! img.device.read_at(&mut buf, 0)?;
//! assert_eq!(&buf, b"boot");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod create;
mod format;
mod hostfile;
mod image;
mod inspect;
mod jsonerr;
mod jsonname;
mod locking;
pub mod maint;
mod policy;
mod protocol;
mod snapshot;

pub use create::create;
pub use diskimg_blockio as blockio;
pub use diskimg_blockio::{
    BlockDevice, CacheMode, DeviceInfo, Error, Extent, ExtentKind, Limits, MapEntry, OptionList,
    Result, Secrets, Storage, block_status, map_chain, map_chain_iter, parse_size,
};
/// Digests of a disk image's guest content (feature `checksum`).
#[cfg(feature = "checksum")]
pub use diskimg_checksum as checksum;
/// The qcow2 crate, for its own API beyond the device capabilities.
#[cfg(feature = "qcow2")]
pub use diskimg_qcow2 as qcow2;
/// Export of a device over NBD and vhost-user-blk (feature `serve`).
#[cfg(feature = "serve")]
pub use diskimg_serve as serve;
/// Sources and sinks that are not local image files: stdin, pipes, HTTP(S), compressed
/// and tar/OVA inputs, streamed qcow2/VMDK/VHD/OVA outputs (feature `stream`).
#[cfg(feature = "stream")]
pub use diskimg_stream as stream;
pub use format::{Format, probe};
pub use hostfile::StorageHook;
pub use image::{Image, ImageOptions, open, open_storage, probe_path};
pub use inspect::{
    Finding, InspectOptions, Reference, ReferenceKind, Report, Severity, Signature, Verdict,
    inspect, inspect_storage,
};
pub use jsonname::{FilterNode, NodeDriver, NodeDrivers, WrapStorage, json_options};
pub use policy::{OpenPolicy, PathRule, SpecialFiles};
pub use protocol::{file_protocol_path, protocol_of, protocol_refusal};
pub use snapshot::{SnapshotSelector, snapshot_device};
