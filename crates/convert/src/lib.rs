//! Convert any [`BlockDevice`] into any other, sparse-aware and optionally parallel.
//!
//! [`convert`] walks the source with [`block_status`](diskimg_blockio::block_status)
//! across its whole backing chain, in chunks (2 MiB by default):
//! - unallocated and known-zero ranges are skipped when the target is known to read as
//!   zeroes ([`ConvertOptions::target_is_zero`]), otherwise written with
//!   [`write_zeroes`](BlockDevice::write_zeroes);
//! - data is read and scanned for all-zero blocks of [`ConvertOptions::sparse_size`]
//!   bytes (qemu-img's `-S`, default 4 KiB; `0` fully allocates the target and scans
//!   nothing);
//! - with [`ConvertOptions::compress`] (or a target that
//!   [needs compressed writes](BlockDevice::needs_compressed_writes)), whole units of
//!   the target's [`compressed_write_granularity`](BlockDevice::compressed_write_granularity)
//!   are compressed by the workers with
//!   [`compress_units`](BlockDevice::compress_units) and stored in guest order with
//!   [`write_compressed_units`](BlockDevice::write_compressed_units) (targets without
//!   the two steps get [`write_compressed`](BlockDevice::write_compressed)); a partial
//!   unit is written plainly unless it is the target's last one;
//! - with [`ConvertOptions::backing`] (qemu-img's `-B`), ranges whose content equals the
//!   target's backing image are left unallocated in the target;
//! - with [`ConvertOptions::copy_offload`] (qemu-img's `-C`), data of the source's top
//!   layer is copied from its [`data_storage`](BlockDevice::data_storage) with the
//!   target's [`write_from`](BlockDevice::write_from) (`copy_file_range`), unscanned;
//! - with [`ConvertOptions::workers`] > 1, chunks are read (and compressed) by that many
//!   threads; writes stay in order unless [`ConvertOptions::out_of_order`] (qemu-img's
//!   `-W`) or the target's [layout is fixed](BlockDevice::fixed_layout) (raw: any order
//!   gives the same image, and several writes at once keep a device busy).
//!
//! The source is only ever read. [`ConcatDevice`] joins several sources end to end
//! (qemu-img convert with more than one input).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
//!                       OptionList, Storage};
//! use diskimg_convert::{convert, ConvertOptions};
//!
//! let make = |size| -> diskimg_blockio::Result<Arc<dyn BlockDevice>> {
//!     let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
//!     diskimg_raw::DRIVER.create(s.clone(), &mut CreateRequest::new(size, OptionList::new()))?;
//!     diskimg_raw::DRIVER.open(s, &OpenOptions::new())
//! };
//! let src = make(1 << 20)?;
//! src.write_at(&[0xab; 4096], 8192)?;
//! let dst = make(1 << 20)?;
//! let opts = ConvertOptions { target_is_zero: true, ..ConvertOptions::default() };
//! let stats = convert(src.as_ref(), dst.as_ref(), &opts, &mut |_done, _total| {})?;
//! assert_eq!(stats.data_bytes, 4096);
//! let mut buf = [0u8; 4096];
//! dst.read_at(&mut buf, 8192)?;
//! assert_eq!(buf, [0xab; 4096]);
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

mod behind;
mod cache;
mod concat;
mod huge;
mod lazy;
mod options;
mod plan;
mod pool;
mod run;
use diskimg_blockio::{BlockDevice, Error, Result};

pub use behind::{MAX_BEHIND, MIN_BEHIND, WriteBehind};
pub use cache::UnsafeCache;
pub use concat::ConcatDevice;
pub use lazy::LazyGrowth;
pub use options::{ConvertOptions, ConvertStats, DEFAULT_CHUNK, DEFAULT_SPARSE};
pub use plan::{Op, is_zero, zero_runs};
pub use pool::Buf;

/// Bytes of source data being compressed at once over all workers (see [`convert`]).
pub const COMPRESS_BUDGET: u64 = 4 << 20;

/// Copies the guest content of `src` (with its backing chain) into `dst`.
///
/// `dst` must be at least as large as `src`; bytes of `dst` beyond `src`'s size are not
/// touched. `progress(done, total)` is called on the calling thread after every chunk.
/// The target is flushed at the end.
pub fn convert(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let total = src.virtual_size();
    if dst.virtual_size() < total {
        return Err(Error::invalid(format!(
            "target image is smaller than the source ({} < {total} bytes)",
            dst.virtual_size()
        )));
    }
    // A target that only takes compressed writes (streamOptimized VMDK) gets them
    // whether or not they were asked for, as qemu-img does.
    let compress = opts.compress || dst.needs_compressed_writes();
    let unit = if compress {
        Some(
            dst.compressed_write_granularity()
                .ok_or_else(|| Error::unsupported(dst.info().format, "compressed writes"))?,
        )
        .filter(|&u| u > 0)
        .ok_or(Error::invalid("compression unit of zero bytes"))?
    } else {
        0
    };
    if opts.sparse_size > 0 && !opts.sparse_size.is_multiple_of(512) {
        return Err(Error::invalid(
            "sparse size must be a multiple of 512 bytes",
        ));
    }
    if opts.copy_offload && opts.compress {
        return Err(Error::invalid(
            "copy offloading cannot be combined with compression",
        ));
    }
    // A target without a data storage stores guest bytes some other way (encrypted,
    // blocks translated by a format without offloading): it could only buffer, so the
    // conversion goes on as without the option, zero detection included (as qemu-img
    // falls back once the target refuses copy_range).
    let offload_store = if opts.copy_offload && !compress && dst.data_storage().is_some() {
        src.data_storage()
    } else {
        None
    };
    let offload = match &offload_store {
        Some(s) => Some((s.as_ref(), s.len()?)),
        None => None,
    };
    let mut chunk = opts.chunk_size.max(512);
    if unit > 0 {
        // Every worker holds the input and output of its chunk while it compresses, and
        // finished chunks wait for the writer: keep the input being compressed at once
        // within COMPRESS_BUDGET over all workers, but at least one unit per chunk.
        let workers = u64::try_from(opts.workers.clamp(1, 64)).unwrap_or(1);
        chunk = chunk.min((COMPRESS_BUDGET / workers).max(unit));
        chunk = chunk
            .checked_next_multiple_of(unit)
            .ok_or(Error::invalid("chunk size overflow"))?;
    }
    // Spare buffers: enough for every worker's chunk and the reorder window.
    let pool = pool::Pool::new(opts.workers.clamp(1, 64) + 2);
    let ctx = plan::Ctx {
        src,
        dst,
        opts,
        unit,
        chunk,
        pool: &pool,
        offload,
        precompress: std::sync::atomic::AtomicBool::new(true),
    };
    let mut stats = run::run(&ctx, dst, total, progress)?;
    stats.total_bytes = total;
    dst.flush()?;
    Ok(stats)
}
