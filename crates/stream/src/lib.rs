//! Image sources that are not local files, as [`Storage`](diskimg_blockio::Storage)s
//! the format drivers read unchanged.
//!
//! - [`open`] turns an argument into an [`Input`]: `-` (stdin: a regular file stays
//!   seekable, a pipe is read front to back), `http://`/`https://` URLs
//!   ([`HttpStorage`]: range requests with a readahead cache, retries, redirects,
//!   headers; one front-to-back pass when the server ignores ranges), wrapped inputs
//!   found by their magic ([`Codec`]: gzip, xz, zstd, bzip2) decoded on the fly, and a
//!   member of a tar/OVA archive (`archive.ova#disk1.vmdk`, or the first disk image).
//! - [`ForwardStorage`] is the forward-only path: a storage over a stream that keeps
//!   the head and a window behind the reading position, so the drivers of formats laid
//!   out front to back (raw, qcow2 with its metadata first) read it as they read a
//!   file, and anything else fails with an error naming the input and offset.
//! - [`write_raw`], [`write_qcow2`] (qemu's `qcow2-to-stdout.py` layout),
//!   [`finish_vhd_fixed`] and [`write_vmdk`] (stream-optimized, VMware's layout) write an
//!   image front to back to any `Write` (stdout); [`write_gcp`] (`disk.raw` in an
//!   oldgnu tar.gz, deflated in parallel by [`ParallelGzip`]) and [`write_ova`] /
//!   [`write_ova_twice`] (OVF descriptor, stream-optimized disk, SHA-256 manifest) write
//!   the archives clouds and hypervisors import.
//!
//! # Example
//!
//! ```
//! use std::io::Write;
//! use diskimg_stream::{InputOptions, open};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.raw.gz");
//! let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
//! gz.write_all(&[0x5a; 4096])?;
//! std::fs::write(&path, gz.finish()?)?;
//!
//! let input = open(path.to_str().unwrap(), &InputOptions::default())?.expect("wrapped");
//! let mut buf = [0u8; 16];
//! input.storage.read_exact_at(&mut buf, 100)?;
//! assert_eq!(buf, [0x5a; 16]);
//! assert_eq!(input.codec.map(|c| c.name()), Some("gzip"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod codec;
mod forward;
mod gzip_out;
mod http;
mod input;
mod ova;
mod recycle;
mod sink;
mod tar;
mod tar_out;
mod vmdk_out;

pub use codec::{Codec, CountingReader, DecodeErrors};
pub use diskimg_vmdk::{ForwardStreamDevice, StreamProfile, is_forward_stream};
pub use forward::{
    ForwardReader, ForwardStorage, HEAD_LIMIT, PROVISIONAL_LEN, StorageReader, WINDOW_LIMIT,
};
pub use gzip_out::ParallelGzip;
pub use http::{HttpOptions, HttpSource, HttpStorage, parse_header};
pub use input::{Input, InputOptions, is_stream_spec, open};
pub use ova::{OvaSpec, ovf_descriptor, write_gcp, write_ova, write_ova_twice};
pub use sink::{finish_vhd_fixed, write_qcow2, write_raw};
pub use tar::{Member, SliceStorage, SparseReader, find_in_storage, find_in_stream, is_tar};
pub use tar_out::{
    TarEntry, TarFormat, data_regions, end_of_archive, header as tar_header,
    padding as tar_padding, write_device_member,
};
pub use vmdk_out::{VmdkStats, write_vmdk};

/// A transport failure (a server's answer, a dropped connection, an input that broke
/// off) as an [`Error::Io`](diskimg_blockio::Error::Io): displayed `{context}: {what}`.
pub(crate) fn transport(
    context: impl Into<std::borrow::Cow<'static, str>>,
    what: impl Into<String>,
) -> diskimg_blockio::Error {
    diskimg_blockio::Error::io(context, std::io::Error::other(what.into()))
}
