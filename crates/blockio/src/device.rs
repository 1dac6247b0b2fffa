//! The guest view of one image layer: the [`BlockDevice`] trait and what it reports.

use std::any::Any;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use crate::capability::{Amend, Bitmaps, ChainLink, Snapshots};
use crate::copy::copy_by_buffer;
use crate::error::{Error, Result};
use crate::info::{CheckReport, DeviceInfo, RepairMode};
use crate::packed::CompressedUnits;
use crate::storage::{Preallocation, Storage};
use crate::vectored::{serve_each, total_len};
use crate::zero::zero_by_buffer;

/// What one guest byte range is, in one image layer (see [`BlockDevice::map`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated data stored in this layer. `offset` is its plain host offset in the image
    /// (or data/extent) file, `None` where there is no such offset (encrypted, or a format
    /// that does not expose it).
    Data {
        /// Host byte offset of the first byte of the extent.
        offset: Option<u64>,
    },
    /// Allocated data stored in this layer at host `offset` whose host bytes are a hole
    /// of the host file (or past its end), so it reads as zeroes: space a format
    /// allocated but never wrote (qcow2 `preallocation=metadata`, static VDI blocks,
    /// VMDK flat extents, fixed VHDs). qemu reports it as `"data": true, "zero": true`
    /// (its block layer adds the file's zero flag to the format's data extent).
    DataZero {
        /// Host byte offset of the first byte of the extent.
        offset: u64,
    },
    /// Reads as zeroes, decided by this layer (a zero flag, a hole in a raw file).
    Zero {
        /// Host offset when the zeroes are backed by host space (raw holes, preallocated).
        offset: Option<u64>,
    },
    /// This layer holds nothing here: reads come from the backing device, or are
    /// zeroes when there is none.
    Unallocated {
        /// Host offset of space this layer reserved for the range without using it
        /// (unwritten subclusters of an allocated qcow2 extended-L2 cluster), which
        /// qemu-img map prints when no lower layer decides the range.
        offset: Option<u64>,
    },
    /// Compressed data stored in this layer (no plain host offset).
    Compressed,
}

impl ExtentKind {
    /// True when a read returns zeroes without consulting another layer.
    pub fn is_zero(self) -> bool {
        matches!(self, ExtentKind::Zero { .. } | ExtentKind::DataZero { .. })
    }
    /// The host offset of the extent's first byte, when it has one.
    pub fn host_offset(self) -> Option<u64> {
        match self {
            ExtentKind::Data { offset }
            | ExtentKind::Zero { offset }
            | ExtentKind::Unallocated { offset } => offset,
            ExtentKind::DataZero { offset } => Some(offset),
            ExtentKind::Compressed => None,
        }
    }
    /// True when this layer determines the content.
    pub fn is_present(self) -> bool {
        !matches!(self, ExtentKind::Unallocated { .. })
    }
}

/// A guest byte range and what it is in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest byte offset.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// What the range is.
    pub kind: ExtentKind,
}

/// Flags for [`BlockDevice::write_zeroes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The device may deallocate the range (qemu's `BDRV_REQ_MAY_UNMAP`) as long as it
    /// still reads as zeroes afterwards, even with a backing device.
    pub may_unmap: bool,
}

/// The guest view of one image layer.
///
/// Offsets are guest byte offsets; every method takes `&self` and implementors lock
/// internally, so one device can serve many threads at once (`Send + Sync`).
///
/// Implementors must:
/// - fail accesses beyond [`DeviceInfo::virtual_size`] with [`Error::OutOfRange`]
///   (use [`check_range`]);
/// - read unallocated ranges from the backing device set with [`BlockDevice::set_backing`],
///   zero-filling beyond its end or when there is none (use [`read_from_backing`]);
/// - never return ciphertext or undecoded compressed bytes as data;
/// - keep the on-disk image consistent if the process dies between any two storage writes
///   (leaked space is acceptable, dangling references are not);
/// - refuse writes with [`Error::ReadOnly`] when opened read-only.
// A new method goes into `forward_device!` (forward_device.rs) too.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Format, size, backing reference and other facts about the image.
    fn info(&self) -> DeviceInfo;

    /// Guest size in bytes.
    fn virtual_size(&self) -> u64 {
        self.info().virtual_size
    }

    /// Fills `buf` with guest bytes starting at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at guest `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Fills `bufs` in order with guest bytes from `offset` (a scatter-gather list,
    /// consecutive in guest space: a virtio descriptor chain). The default goes through
    /// the device's layout walk ([`BlockDevice::walk_runs`]): each host run is one
    /// vectored storage read (`preadv(2)` for files) over the buffer parts it fills; a
    /// device without one reads each buffer with [`BlockDevice::read_at`] (no bounce
    /// buffer either way).
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        crate::layout::read_walked(self, bufs, offset)
    }

    /// Calls `f(layout, guest offset, length, mapping)` for each run of
    /// `offset..offset+len`, as [`for_each_run`](crate::for_each_run) walks them, and
    /// returns `Ok(true)`; for formats whose reads go through the guest-I/O skeleton
    /// ([`read_via`](crate::read_via)), in one line: `walk(&self.view(), offset, len, f)`
    /// ([`walk`](crate::walk)). It is the one place vectored reads
    /// ([`BlockDevice::read_vectored_at`]'s default) and the async face
    /// ([`AsyncDevice`](crate::AsyncDevice)) plan a read. The mappings may be read after
    /// the format's lock is released (the async face does), as
    /// [`read_via`](crate::read_via) may: a read racing with a write or discard of the
    /// same range sees either. The default, `Ok(false)`: the device has no walk, callers
    /// use [`BlockDevice::read_at`].
    fn walk_runs(
        &self,
        _offset: u64,
        _len: u64,
        _f: &mut crate::layout::RunFn<'_>,
    ) -> Result<bool> {
        Ok(false)
    }

    /// A count that moves whenever host bytes that [`BlockDevice::walk_runs`] may have
    /// reported as a guest range's home ([`Mapping::Host`](crate::Mapping::Host)) stop
    /// being it: the host space is freed for reuse, moved, or given other guest data.
    /// A caller that reads reported runs after the walk returned (a detached read: an
    /// io_uring read the kernel completes later) takes it before the walk and again
    /// after its read completed; equal values mean the bytes read are the guest data the
    /// walk mapped (or, for a range written or discarded meanwhile, what a read racing
    /// with that write or discard may return), different ones that it must read again.
    /// Writes in place, allocations of fresh space and reads do not move it.
    ///
    /// `None` (the default): the device cannot tell, and runs must be read inside the
    /// walk (as [`BlockDevice::read_vectored_at`]'s default does). A device that answers
    /// includes every layer its walk reports runs of (its backing device's count).
    fn host_epoch(&self) -> Option<u64> {
        None
    }

    /// Writes `bufs` in order at guest `offset` (see [`BlockDevice::read_vectored_at`]).
    /// Like consecutive [`BlockDevice::write_at`] calls (the default, which gathers small
    /// buffers into calls of up to 1 MiB: [`write_each`]), not one atomic write; raw uses
    /// `pwritev(2)`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        write_each(self, bufs, offset)
    }

    /// Makes `len` bytes at `offset` read as zeroes. The default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        check_range(offset, len, self.virtual_size())?;
        zero_by_buffer(offset, len, |zero, at| self.write_at(zero, at))
    }

    /// Tells the device the range is no longer needed. Like qemu's discard this is a hint:
    /// afterwards the range reads as before, as zeroes, or as the backing device's data,
    /// whichever the format chooses (use [`BlockDevice::write_zeroes`] with `may_unmap` to
    /// deallocate with a defined result). The default does nothing.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.virtual_size())
    }

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Closes the image: writes what the format keeps in memory until then (qcow2's
    /// persistent dirty bitmaps) and flushes, reporting errors that dropping the device
    /// would have to swallow. Reads still work afterwards; writes, zeroes, discards and
    /// resizes fail with [`Error::Closed`](crate::Error::Closed) in every format (each
    /// holds a [`Closed`](crate::Closed)); calling it again does nothing. The default
    /// (for devices outside this workspace) flushes a writable device.
    fn close(&self) -> Result<()> {
        if self.info().read_only {
            return Ok(());
        }
        self.flush()
    }

    /// Describes the range starting at `offset`: returns one extent beginning at `offset`,
    /// no longer than `len` (and never past the virtual size), whose bytes are all of one
    /// [`ExtentKind`]. `len` must be non-zero and `offset` inside the disk.
    fn map(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Other host files whose byte offsets [`BlockDevice::map`] can report — a VMDK's
    /// extent files, a qcow2 external data file — named as the image names them (a
    /// relative name is relative to the image's directory). Entry `i` is file `i + 1` of
    /// [`BlockDevice::map_file`]; file 0 is the image's own file. The default: none.
    fn host_files(&self) -> Vec<String> {
        Vec::new()
    }

    /// Which host file the host offset of the [`ExtentKind::Data`], [`ExtentKind::DataZero`]
    /// or [`ExtentKind::Zero`] extent that `map(offset, …)` returns refers to: 0 for the image's own file, `i + 1`
    /// for [`BlockDevice::host_files`]`()[i]` (qemu-img map's "File" column). The default:
    /// 0, for formats that keep their data in their own file.
    fn map_file(&self, _offset: u64) -> usize {
        0
    }

    /// The size of the unit [`BlockDevice::write_compressed`] takes, when supported.
    fn compressed_write_granularity(&self) -> Option<u64> {
        None
    }

    /// Writes whole, aligned units of [`BlockDevice::compressed_write_granularity`]
    /// bytes compressed. Only for units that were never written before (as `convert -c`).
    fn write_compressed(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported(self.info().format, "compressed writes"))
    }

    /// Compresses whole units as [`BlockDevice::write_compressed`] would (same rules for
    /// `buf` and `offset`) without touching the image, for a later
    /// [`BlockDevice::write_compressed_units`]. Safe to call from many threads at once:
    /// the CPU work of a compressed write, done wherever the caller likes. The default
    /// refuses ([`Error::Unsupported`]); callers then use `write_compressed`.
    fn compress_units(&self, _buf: &[u8], _offset: u64) -> Result<CompressedUnits> {
        Err(Error::unsupported(self.info().format, "compressed writes"))
    }

    /// Stores units that [`BlockDevice::compress_units`] of this device prepared: the
    /// image ends up as after [`BlockDevice::write_compressed`] of the same bytes. Only
    /// for units that were never written before.
    fn write_compressed_units(&self, _units: CompressedUnits) -> Result<()> {
        Err(Error::unsupported(self.info().format, "compressed writes"))
    }

    /// True when every guest byte has a host place that does not depend on the order of
    /// writes (a raw image): writers in any order produce the same image, so a copy may
    /// write from several threads at once without changing the result. The default is
    /// false (formats that allocate as they are written lay out in write order).
    fn fixed_layout(&self) -> bool {
        false
    }

    /// True when data can only be written compressed, in whole units that were never
    /// written before (qemu's `needs_compressed_writes`: a streamOptimized VMDK). A copy
    /// into such a device compresses whether or not it was asked to (`qemu-img convert`
    /// without `-c`). The default is false.
    fn needs_compressed_writes(&self) -> bool {
        false
    }

    /// Connects (or disconnects) the device reads defer to for unallocated ranges.
    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) -> Result<()> {
        match backing {
            None => Ok(()),
            Some(_) => Err(Error::unsupported(self.info().format, "backing files")),
        }
    }

    /// The device set with [`BlockDevice::set_backing`].
    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }

    /// Changes the virtual size. Shrinking needs `shrink`.
    fn resize(&self, _new_size: u64, _prealloc: Preallocation, _shrink: bool) -> Result<()> {
        Err(Error::unsupported(self.info().format, "resizing"))
    }

    /// Checks (and optionally repairs) the image's metadata.
    fn check(&self, _repair: RepairMode) -> Result<CheckReport> {
        Err(Error::unsupported(self.info().format, "checks"))
    }

    /// The storage that the host offsets of this layer's [`ExtentKind::Data`] extents
    /// refer to, when every such offset is a plain byte offset in one storage (copying
    /// `len` bytes from there gives the guest bytes). `None` (the default) when there is
    /// no such storage (encrypted data, several extent files, translated offsets).
    /// Copy offloading (`convert -C`) reads a source's data from here, and offloads only
    /// into targets that have one: a device overriding [`BlockDevice::write_from`] to
    /// copy should return it.
    fn data_storage(&self) -> Option<Arc<dyn Storage>> {
        None
    }

    /// Writes `len` guest bytes at `offset` taken from `src` at host offset
    /// `src_offset`, as [`BlockDevice::write_at`] with those bytes would. Devices that
    /// store guest bytes plainly override it to copy with [`crate::copy_range`]
    /// (`copy_file_range`, qemu-img's `convert -C`); the default reads and writes through
    /// a buffer of at most 1 MiB ([`write_from_by_buffer`]).
    fn write_from(&self, offset: u64, len: u64, src: &dyn Storage, src_offset: u64) -> Result<()> {
        write_from_by_buffer(self, offset, len, src, src_offset)
    }

    /// What the refcount repair of a read-write open of an image left dirty (qcow2 lazy
    /// refcounts) found, in `qemu-img check`'s words ("Repairing cluster 1 refcount=1
    /// reference=0"). qemu prints them to stderr as it repairs; a library leaves that to
    /// its caller. The default (and a clean open) has none.
    fn repaired_at_open(&self) -> Vec<String> {
        Vec::new()
    }

    /// Internal snapshots, when the format has them ([`Snapshots`]).
    fn as_snapshots(&self) -> Option<&dyn Snapshots> {
        None
    }

    /// Persistent dirty bitmaps, when the image can hold them ([`Bitmaps`]).
    fn as_bitmaps(&self) -> Option<&dyn Bitmaps> {
        None
    }

    /// Option amendment, when the format supports it ([`Amend`]).
    fn as_amend(&self) -> Option<&dyn Amend> {
        None
    }

    /// Backing-link maintenance (rebase, commit), when the format has any ([`ChainLink`]).
    fn as_chain_link(&self) -> Option<&dyn ChainLink> {
        None
    }

    /// The concrete device, for a format crate's own use (checking that a backing device
    /// of its own format is the parent the image names) and for its tests. Code above
    /// the format crates uses the capability accessors instead
    /// ([`BlockDevice::as_snapshots`] and the others).
    fn as_any(&self) -> &dyn Any;
}

/// [`BlockDevice::write_from`] through a buffer: reads of at most 1 MiB from `src`, each
/// followed by a [`BlockDevice::write_at`].
pub fn write_from_by_buffer<D: BlockDevice + ?Sized>(
    dev: &D,
    offset: u64,
    len: u64,
    src: &dyn Storage,
    src_offset: u64,
) -> Result<()> {
    check_range(offset, len, dev.virtual_size())?;
    if src_offset.checked_add(len).is_none() {
        return Err(Error::invalid("copy range overflows"));
    }
    copy_by_buffer(
        len,
        |piece, done| src.read_exact_at(piece, src_offset + done),
        |piece, done| dev.write_at(piece, offset + done),
    )
}

/// [`BlockDevice::read_vectored_at`]'s default: one `read_at` per buffer.
pub fn read_each<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> Result<()> {
    let len = total_len(bufs.iter().map(|b| b.len()), offset)?;
    check_range(offset, len, dev.virtual_size())?;
    serve_each(bufs.iter_mut().map(|b| &mut **b), offset, |b, o| {
        dev.read_at(b, o)
    })
}

/// Buffers shorter than this are gathered by [`write_each`].
const GATHER_BELOW: usize = 64 << 10;
/// Most bytes [`write_each`] gathers into one `write_at`.
const GATHER_MAX: usize = 1 << 20;

thread_local! {
    /// [`write_each`]'s staging buffer, kept per thread so a request costs no allocation.
    static STAGE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`BlockDevice::write_vectored_at`]'s default: consecutive small buffers (a guest's
/// 4 KiB pages) are gathered into one `write_at` of up to 1 MiB, each larger buffer is
/// one `write_at` of its own. A format's write costs a lock and a mapping lookup per
/// call, so 256 calls for one 1 MiB virtio request cost several times the copy.
pub fn write_each<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> Result<()> {
    let len = total_len(bufs.iter().map(|b| b.len()), offset)?;
    check_range(offset, len, dev.virtual_size())?;
    if bufs
        .iter()
        .filter(|b| b.len() < GATHER_BELOW)
        .take(2)
        .count()
        < 2
    {
        return serve_each(bufs.iter().map(|b| &**b), offset, |b, o| dev.write_at(b, o));
    }
    STAGE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut stage) => gather(dev, bufs, offset, &mut stage),
        // A device writing vectored from inside its own `write_at`: a buffer of its own.
        Err(_) => gather(dev, bufs, offset, &mut Vec::new()),
    })
}

/// [`write_each`]'s loop over `bufs` with `stage` as the gathering buffer.
fn gather<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &[IoSlice<'_>],
    offset: u64,
    stage: &mut Vec<u8>,
) -> Result<()> {
    stage.clear();
    let (mut off, mut staged_at) = (offset, offset);
    for b in bufs.iter().filter(|b| !b.is_empty()) {
        let full = stage.len() + b.len() > GATHER_MAX;
        if !stage.is_empty() && (b.len() >= GATHER_BELOW || full) {
            dev.write_at(stage, staged_at)?;
            stage.clear();
        }
        if b.len() >= GATHER_BELOW {
            dev.write_at(b, off)?;
        } else {
            if stage.is_empty() {
                staged_at = off;
            }
            stage.extend_from_slice(b);
        }
        off += b.len() as u64;
    }
    if !stage.is_empty() {
        dev.write_at(stage, staged_at)?;
    }
    Ok(())
}

/// Fails with [`Error::OutOfRange`] unless `offset..offset+len` lies within `size`.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Reads `buf` at guest `offset` from an optional backing device: the part inside the
/// backing device's size comes from it, the rest (or all, without backing) is zeroes.
pub fn read_from_backing(
    backing: Option<&dyn BlockDevice>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    let Some(b) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let size = b.virtual_size();
    let avail = size.saturating_sub(offset).min(buf.len() as u64);
    let avail = usize::try_from(avail).unwrap_or(buf.len());
    let (head, tail) = buf.split_at_mut(avail);
    if !head.is_empty() {
        b.read_at(head, offset)?;
    }
    tail.fill(0);
    Ok(())
}

/// What a host hole under a format's data means to `map` ([`map_host_run`],
/// [`HostRun::holes`](crate::HostRun::holes)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Holes {
    /// Host holes are not looked for: the run maps as [`ExtentKind::Data`] whatever the
    /// host file holds (qemu's formats without recursion into their file).
    #[default]
    Ignored,
    /// Holes map as [`ExtentKind::Zero`] with their offset: the format passes the file's
    /// status through (qemu's `BDRV_BLOCK_RAW`: raw images).
    Zero,
    /// Holes map as [`ExtentKind::DataZero`]: the format's data extent gains the file's
    /// zero flag (qemu's `BDRV_BLOCK_RECURSE`: fixed VHDs, static VDIs, VMDK flat
    /// extents, metadata-preallocated qcow2).
    DataZero,
}

/// Maps guest bytes stored contiguously in `storage`: `len` (> 0) guest bytes at `guest`
/// live at host offset `host`. Returns the first run, which is either data or a host hole
/// (or the range past the file's end), which reads as zeroes and maps as `holes` says,
/// using [`Storage::next_data`]/[`Storage::next_hole`].
pub fn map_host_run(
    storage: &dyn Storage,
    guest: u64,
    host: u64,
    len: u64,
    holes: Holes,
) -> Result<Extent> {
    if len == 0 {
        return Err(Error::invalid("map of an empty range"));
    }
    let data = ExtentKind::Data { offset: Some(host) };
    if holes == Holes::Ignored {
        return Ok(Extent {
            offset: guest,
            len,
            kind: data,
        });
    }
    let hole = match holes {
        Holes::DataZero => ExtentKind::DataZero { offset: host },
        _ => ExtentKind::Zero { offset: Some(host) },
    };
    let (kind, run) = match storage.next_data(host)? {
        Some(d) if d <= host => {
            let end = storage.next_hole(host)?.max(host + 1);
            (data, end - host)
        }
        Some(d) => (hole, d - host),
        None => (hole, len),
    };
    Ok(Extent {
        offset: guest,
        len: run.min(len),
        kind,
    })
}

/// Iterates the extents of `dev` over `offset..offset+len`, merging neighbours of the
/// same kind (with contiguous host offsets).
pub fn map_all(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<Extent>> {
    check_range(offset, len, dev.virtual_size())?;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let e = dev.map(pos, end - pos)?;
        if e.len == 0 || e.offset != pos {
            return Err(Error::internal(
                "device map returned an empty or misplaced extent",
            ));
        }
        let e = Extent {
            len: e.len.min(end - pos),
            ..e
        };
        pos += e.len;
        if let Some(last) = out.last_mut().filter(|l| mergeable(l, &e)) {
            last.len += e.len;
            continue;
        }
        out.push(e);
    }
    Ok(out)
}

fn mergeable(a: &Extent, b: &Extent) -> bool {
    let contiguous = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => x.checked_add(a.len) == Some(y),
        (None, None) => true,
        _ => false,
    };
    match (a.kind, b.kind) {
        (ExtentKind::Data { offset: x }, ExtentKind::Data { offset: y }) => contiguous(x, y),
        (ExtentKind::Zero { offset: x }, ExtentKind::Zero { offset: y }) => contiguous(x, y),
        (ExtentKind::DataZero { offset: x }, ExtentKind::DataZero { offset: y }) => {
            contiguous(Some(x), Some(y))
        }
        (ExtentKind::Unallocated { offset: x }, ExtentKind::Unallocated { offset: y }) => {
            contiguous(x, y)
        }
        (ExtentKind::Compressed, ExtentKind::Compressed) => true,
        _ => false,
    }
}
