//! Digests of a disk image's guest content, the same for the same guest bytes in any
//! format and any allocation.
//!
//! - [`checksum`] walks a [`BlockDevice`] (with its backing chain) in parallel: zero
//!   ranges that [`block_status`](diskimg_blockio::block_status) reports (holes,
//!   unallocated or zero clusters) are hashed without being read; data is read by
//!   worker threads.
//! - [`Algorithm::Blkhash`] (the default) is blkhash's construction as `blksum`
//!   computes it (blkhash 0.10+: SHA-256, 64 KiB blocks, the message length appended),
//!   so a digest can be compared with `blksum` of the raw image; its blocks are hashed
//!   in parallel. [`Algorithm::Sha256`] and [`Algorithm::Blake3`] are the plain digests
//!   of the guest bytes (`sha256sum`, `b3sum` of the raw image).
//! - [`Hasher`] is the incremental form (`update`, `zero`, `finalize`) for byte streams.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
//!                       OptionList, Storage};
//! use diskimg_checksum::{Algorithm, Hasher, Options, checksum};
//!
//! let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! diskimg_raw::DRIVER.create(s.clone(), &mut CreateRequest::new(1 << 20, OptionList::new()))?;
//! let dev = diskimg_raw::DRIVER.open(s, &OpenOptions::new())?;
//! dev.write_at(b"hello", 4096)?;
//!
//! let digest = checksum(dev.as_ref(), &Options::default(), &mut |_, _| {})?;
//! // The same as hashing the plain bytes incrementally.
//! let mut h = Hasher::new(Algorithm::Blkhash);
//! h.zero(4096);
//! h.update(b"hello");
//! h.zero((1 << 20) - 4096 - 5);
//! assert_eq!(digest, h.finalize());
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

mod hasher;
mod walk;

use diskimg_blockio::{BlockDevice, Result};

pub use hasher::{
    Algorithm, BLOCK_SIZE, BlockDigest, Digest, Hasher, MD_LEN, block_digest, zero_block_digest,
};

/// How [`checksum`] works.
#[derive(Clone, Debug)]
pub struct Options {
    /// The digest.
    pub algorithm: Algorithm,
    /// Reader (and, for blkhash, hashing) threads; 1 works on the calling thread.
    pub workers: usize,
    /// Bytes per read (rounded up to whole 64 KiB blocks).
    pub chunk_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Blkhash,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
            chunk_size: 4 << 20,
        }
    }
}

/// The digest of `dev`'s guest content (through its backing chain).
/// `progress(done, total)` is called on the calling thread as bytes are hashed.
pub fn checksum(
    dev: &dyn BlockDevice,
    opts: &Options,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Digest> {
    walk::run(dev, opts, progress)
}
