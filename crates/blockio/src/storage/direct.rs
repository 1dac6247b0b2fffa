//! `O_DIRECT` I/O for [`FileStorage`](crate::FileStorage) (cache modes `none` and
//! `directsync`): the kernel takes only requests whose offset, length and buffer are
//! aligned, and this module aligns what the formats ask for.
//!
//! - The alignment comes from the device's logical block size (`BLKSSZGET`) for block
//!   devices, else from `statx(STATX_DIOALIGN)` (Linux 6.1+), else it is probed as
//!   qemu's `raw_probe_alignment` does: reads of 1, 512, … 4096 bytes at offset 0; when
//!   even a 1-byte read works the file system does not check, and 4096 (qemu's safe
//!   value) is used. Nothing working is qemu's "Could not find working O_DIRECT
//!   alignment".
//! - Aligned requests from aligned buffers go straight to the kernel (convert's pool
//!   buffers are page-aligned); aligned requests from other buffers are copied through
//!   an aligned bounce buffer of at most 1 MiB.
//! - Unaligned writes read-modify-write the partial blocks at their ends. They take an
//!   exclusive lock that aligned writes take shared, so two writes into different parts
//!   of one block never undo each other. A block padded past the end of the file is
//!   trimmed back afterwards: the file keeps the length a buffered write would give it.
//! - Reads past the end of the file fail as buffered ones do.
//! - In cache mode `none` (not `directsync`), partial blocks inside the file are kept in
//!   memory until the next flush instead of being read and written back at once
//!   ([`super::dirty`]): metadata updates of a few bytes cost no device round trip.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use super::dirty::Dirty;

/// Largest bounce buffer.
const BOUNCE: usize = 1 << 20;

/// Largest vectored request [`DirectIo::read_gathered`] / [`DirectIo::write_gathered`]
/// serve as one request through one aligned buffer; larger ones go buffer by buffer.
const GATHER_MAX: usize = 8 << 20;
/// The alignment used when probing finds no constraint (qemu's `MAX_BLOCKSIZE`).
const SAFE_ALIGN: usize = 4096;

/// Alignment needs of one `O_DIRECT` file, and the lock for read-modify-write.
#[derive(Debug)]
pub(crate) struct DirectIo {
    /// Request offsets and lengths are multiples of this (a power of two).
    align: usize,
    /// Buffers start at a multiple of this (a power of two).
    mem_align: usize,
    /// Exclusive for read-modify-write and write-back of `dirty`, shared for aligned
    /// writes and (while partial blocks may be cached) for reads.
    rmw: RwLock<()>,
    /// Partial blocks are cached (cache mode `none`, and no io_uring around the file).
    caching: AtomicBool,
    /// The cached partial blocks (lock order: `rmw`, then `dirty`).
    dirty: Mutex<Dirty>,
}

/// `len` bytes starting at an `align` boundary inside an over-allocated vector.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new(len: usize, align: usize) -> Self {
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align).min(align);
        Self { raw, start }
    }
    fn get(&mut self, len: usize) -> &mut [u8] {
        self.raw
            .get_mut(self.start..self.start + len)
            .unwrap_or_default()
    }
}

fn eof() -> io::Error {
    io::Error::new(ErrorKind::UnexpectedEof, "failed to fill whole buffer")
}

fn is_pow2(v: u32) -> Option<usize> {
    let v = usize::try_from(v).ok()?;
    (v.is_power_of_two() && v <= BOUNCE).then_some(v)
}

impl DirectIo {
    /// Finds the alignment `file` (opened with `O_DIRECT`) needs; `caching`: partial
    /// blocks may wait for the next flush (cache mode `none`).
    pub(crate) fn probe(file: &File, caching: bool) -> io::Result<Self> {
        let mut align = None;
        let mut mem_align = None;
        if file.metadata()?.file_type().is_block_device() {
            align = rustix::fs::ioctl_blksszget(file).ok().and_then(is_pow2);
        }
        if align.is_none() {
            use rustix::fs::{AtFlags, StatxFlags};
            if let Ok(st) = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN)
                && st.stx_mask & StatxFlags::DIOALIGN.bits() != 0
            {
                align = is_pow2(st.stx_dio_offset_align);
                mem_align = is_pow2(st.stx_dio_mem_align);
            }
        }
        let align = match align {
            Some(a) => a,
            None => probe_by_reading(file)?,
        };
        Ok(Self {
            align,
            mem_align: mem_align.unwrap_or(align).max(1),
            rmw: RwLock::new(()),
            caching: AtomicBool::new(caching),
            dirty: Mutex::new(Dirty::default()),
        })
    }

    /// Request offsets and lengths are multiples of this (a power of two).
    pub(crate) fn align(&self) -> u64 {
        self.align as u64
    }

    fn dirty(&self) -> MutexGuard<'_, Dirty> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the cached partial blocks back (before a flush, and before file operations
    /// that bypass this module: `fallocate`, truncation, `SEEK_DATA`).
    pub(crate) fn write_back(&self, file: &File) -> io::Result<()> {
        if self.dirty().is_empty() {
            return Ok(());
        }
        let _exclusive = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        self.write_back_locked(file, &mut self.dirty())
    }

    /// [`Self::write_back`] with `rmw` held exclusively.
    fn write_back_locked(&self, file: &File, dirty: &mut Dirty) -> io::Result<()> {
        if dirty.is_empty() {
            return Ok(());
        }
        let mut scratch = Aligned::new(self.bounce_len(), self.mem_align.max(self.align));
        let scratch = scratch.get(self.bounce_len());
        dirty.write_back(scratch, |b, off| file.write_all_at(b, off))
    }

    /// Stops caching partial blocks (after writing back those cached): io_uring requests
    /// on the file go around this module.
    pub(crate) fn stop_caching(&self, file: &File) -> io::Result<()> {
        let _exclusive = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        self.write_back_locked(file, &mut self.dirty())?;
        self.caching.store(false, Ordering::Release);
        Ok(())
    }

    fn aligned(&self, off: u64, len: usize) -> bool {
        off.is_multiple_of(self.align as u64) && len.is_multiple_of(self.align)
    }

    /// True when a request of `len` bytes at `off` from memory at `ptr` may go to the
    /// kernel as it is (offset, length and buffer aligned).
    pub(crate) fn fits(&self, ptr: *const u8, off: u64, len: usize) -> bool {
        self.aligned(off, len) && ptr.align_offset(self.mem_align) == 0
    }

    /// The buffer and length alignment of a plain read of `len` bytes at `off` straight
    /// from the file ([`Storage::plain_read`](crate::Storage::plain_read)); `None` when
    /// the range is not aligned or a partial block inside it is cached (the file does
    /// not hold its bytes yet).
    pub(crate) fn plain_read(&self, off: u64, len: u64) -> Option<(usize, usize)> {
        let n = usize::try_from(len).ok()?;
        if !self.aligned(off, n) {
            return None;
        }
        if self.caching.load(Ordering::Acquire) && self.dirty().overlaps(off, len, self.align) {
            return None;
        }
        Some((self.mem_align, self.align))
    }

    /// The lock aligned writes hold shared (read-modify-writes hold it exclusively).
    pub(crate) fn shared_write(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.rmw.read().unwrap_or_else(|p| p.into_inner())
    }

    fn bounce_len(&self) -> usize {
        BOUNCE.max(self.align)
    }

    /// Reads exactly `buf.len()` bytes at `off`.
    pub(crate) fn read_exact(&self, file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let guard = self.overlay_guard();
        self.read_uncached(file, buf, off)?;
        if guard.is_some() {
            self.overlay([buf], off);
        }
        Ok(())
    }

    /// What a read from the file holds until it has laid the cached partial blocks over
    /// the bytes it read ([`Self::overlay`]): `rmw` shared while blocks may be cached, so
    /// no write-back (which forgets the blocks it wrote) comes between the two; `None`
    /// when nothing is cached (no overlay needed).
    fn overlay_guard(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        self.caching
            .load(Ordering::Acquire)
            .then(|| self.rmw.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Lays the cached partial blocks over `bufs`, read one after the other from `off`
    /// on (with [`Self::overlay_guard`] held since before the read).
    fn overlay<'b>(&self, bufs: impl IntoIterator<Item = &'b mut [u8]>, off: u64) {
        let dirty = self.dirty();
        if dirty.is_empty() {
            return;
        }
        let mut at = off;
        for b in bufs {
            dirty.overlay(b, at, self.align);
            at += b.len() as u64;
        }
    }

    /// Reads exactly `buf.len()` bytes at `off` from the file (not the cached blocks).
    fn read_uncached(&self, file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
        let len = buf.len();
        if self.aligned(off, len) && buf.as_ptr().align_offset(self.mem_align) == 0 {
            return match self.read_some(file, buf, off)? {
                n if n == len => Ok(()),
                _ => Err(eof()),
            };
        }
        let a = self.align as u64;
        let end = off + len as u64;
        let span = end.div_ceil(a) * a - off / a * a;
        let mut bounce = Aligned::new(
            self.bounce_len().min(idx(span)),
            self.mem_align.max(self.align),
        );
        let mut pos = off;
        while pos < end {
            let a0 = pos / a * a;
            let a1 = end
                .div_ceil(a)
                .saturating_mul(a)
                .min(a0 + self.bounce_len() as u64);
            let want = end.min(a1);
            let b = bounce.get(idx(a1 - a0));
            if (self.read_some(file, b, a0)? as u64) < want - a0 {
                return Err(eof());
            }
            let (from, to) = (idx(pos - a0), idx(want - a0));
            let (dfrom, dto) = (idx(pos - off), idx(want - off));
            buf.get_mut(dfrom..dto)
                .ok_or_else(eof)?
                .copy_from_slice(b.get(from..to).ok_or_else(eof)?);
            pos = want;
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes (aligned offset, length and buffer) until the end of
    /// the file; returns how many.
    fn read_some(&self, file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(buf.get_mut(got..).unwrap_or_default(), off + got as u64) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    // A short read that is not a whole block ends at the end of the file.
                    if !got.is_multiple_of(self.align) {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Writes all of `buf` at `off`.
    pub(crate) fn write_all(&self, file: &File, buf: &[u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.aligned(off, buf.len()) {
            let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            {
                // Cached blocks the write covers take its bytes (before the device does:
                // a read meanwhile sees either the old or the new bytes).
                let mut dirty = self.dirty();
                if !dirty.is_empty() {
                    dirty.update(buf, off, self.align);
                }
            }
            return self.write_aligned(file, buf, off);
        }
        if self.caching.load(Ordering::Acquire) && self.write_cached_hit(buf, off) {
            return Ok(());
        }
        let _exclusive = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        if self.caching.load(Ordering::Acquire) && self.write_cached(file, buf, off)? {
            return Ok(());
        }
        // The blocks read back below must be current.
        self.write_back_locked(file, &mut self.dirty())?;
        self.read_modify_write(file, buf, off)
    }

    /// An aligned request, from `buf` or through a bounce buffer.
    fn write_aligned(&self, file: &File, buf: &[u8], off: u64) -> io::Result<()> {
        if buf.as_ptr().align_offset(self.mem_align) == 0 {
            return file.write_all_at(buf, off);
        }
        let mut bounce = Aligned::new(self.bounce_len().min(buf.len()), self.mem_align);
        let mut done = 0usize;
        for piece in buf.chunks(self.bounce_len()) {
            let b = bounce.get(piece.len());
            b.copy_from_slice(piece);
            file.write_all_at(b, off + done as u64)?;
            done += piece.len();
        }
        Ok(())
    }

    /// An unaligned write inside at most two blocks that are both cached already (the
    /// next update of a metadata block): it only changes memory, so it takes `rmw`
    /// shared and does not wait for aligned writes in flight elsewhere in the file (a
    /// writer thread's 8-byte L2 update behind another thread's 2 MiB data write). False
    /// (nothing done) otherwise.
    fn write_cached_hit(&self, buf: &[u8], off: u64) -> bool {
        let a = self.align as u64;
        let end = off + buf.len() as u64;
        let (first, last) = (off / a * a, (end - 1) / a * a);
        if last > first + a {
            return false;
        }
        let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
        let mut dirty = self.dirty();
        if dirty.get_mut(first).is_none() || dirty.get_mut(last).is_none() {
            return false;
        }
        dirty.update(buf, off, self.align);
        true
    }

    /// An unaligned write whose blocks all lie inside the file (with `rmw` held
    /// exclusively): whole blocks go to the device, the partial ones at either end into
    /// the cache (read from the device when not cached yet). False (nothing done) for a
    /// write reaching past the file's last whole block: that one pads and trims.
    fn write_cached(&self, file: &File, buf: &[u8], off: u64) -> io::Result<bool> {
        let a = self.align as u64;
        let end = off + buf.len() as u64;
        if end.div_ceil(a) * a > file.metadata()?.len() {
            return Ok(false);
        }
        let mut dirty = self.dirty();
        let (mid_lo, mid_hi) = (off.div_ceil(a) * a, end / a * a);
        if mid_lo < mid_hi {
            let mid = buf
                .get(idx(mid_lo - off)..idx(mid_hi - off))
                .unwrap_or_default();
            dirty.update(mid, mid_lo, self.align);
            self.write_aligned(file, mid, mid_lo)?;
        }
        for b in [off / a * a, (end - 1) / a * a] {
            if (b >= mid_lo && b < mid_hi) || dirty.get_mut(b).is_some() {
                continue;
            }
            let mut block = Aligned::new(self.align, self.mem_align.max(self.align));
            let bytes = block.get(self.align);
            self.read_block(file, bytes, b)?;
            dirty.insert(b, bytes.to_vec());
        }
        dirty.update(buf, off, self.align);
        if dirty.is_full(self.align) {
            self.write_back_locked(file, &mut dirty)?;
        }
        Ok(true)
    }

    fn read_modify_write(&self, file: &File, buf: &[u8], off: u64) -> io::Result<()> {
        let a = self.align as u64;
        let old_len = file.metadata()?.len();
        let end = off + buf.len() as u64;
        let aligned_end = end.div_ceil(a) * a;
        let span = aligned_end - off / a * a;
        let mut bounce = Aligned::new(
            self.bounce_len().min(idx(span)),
            self.mem_align.max(self.align),
        );
        let mut pos = off;
        while pos < end {
            let a0 = pos / a * a;
            let a1 = aligned_end.min(a0 + self.bounce_len() as u64);
            let want = end.min(a1);
            let n = idx(a1 - a0);
            let b = bounce.get(n);
            if pos > a0 {
                self.read_block(file, b.get_mut(..self.align).unwrap_or_default(), a0)?;
            }
            if want < a1 && (a1 - a0 > a || pos == a0) {
                let tail = b.get_mut(n - self.align..).unwrap_or_default();
                self.read_block(file, tail, a1 - a)?;
            }
            let src = buf.get(idx(pos - off)..idx(want - off)).unwrap_or_default();
            b.get_mut(idx(pos - a0)..idx(want - a0))
                .unwrap_or_default()
                .copy_from_slice(src);
            file.write_all_at(b, a0)?;
            pos = want;
        }
        // The last block was padded: give the file the length a buffered write would.
        let keep = old_len.max(end);
        if aligned_end > keep {
            file.set_len(keep)?;
        }
        Ok(())
    }

    /// Reads one block, zero-filled past the end of the file.
    fn read_block(&self, file: &File, block: &mut [u8], off: u64) -> io::Result<()> {
        let got = self.read_some(file, block, off)?;
        block.get_mut(got..).unwrap_or_default().fill(0);
        Ok(())
    }
}

fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// qemu's probe: the smallest read size at offset 0 the kernel does not refuse with
/// `EINVAL`, into a buffer aligned to 4096.
fn probe_by_reading(file: &File) -> io::Result<usize> {
    let mut buf = Aligned::new(SAFE_ALIGN, SAFE_ALIGN);
    for size in [1usize, 512, 1024, 2048, 4096] {
        match file.read_at(buf.get(size), 0) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
            // A byte-sized read working means the file system does not check: be safe.
            _ if size == 1 => return Ok(SAFE_ALIGN),
            _ => return Ok(size),
        }
    }
    Err(io::Error::new(
        ErrorKind::InvalidInput,
        "Could not find working O_DIRECT alignment (try cache.direct=off)",
    ))
}

impl DirectIo {
    /// A vectored read as one read of the whole range into an aligned buffer, copied out
    /// to `bufs`: with `O_DIRECT` every buffer read on its own is a device request of its
    /// own (a 1 MiB request of 4 KiB guest pages would be 256). `None` when there is less
    /// than two buffers or more than [`GATHER_MAX`] bytes (the caller reads buffer by
    /// buffer).
    pub(crate) fn read_gathered(
        &self,
        file: &File,
        bufs: &mut [io::IoSliceMut<'_>],
        off: u64,
    ) -> Option<io::Result<()>> {
        let len = gather_len(bufs.iter().map(|b| b.len()))?;
        if let Some(r) = self.read_aligned(file, bufs, off) {
            return Some(r);
        }
        let mut bounce = Aligned::new(len, self.mem_align);
        let mut all: &[u8] = {
            let whole = bounce.get(len);
            if let Err(e) = self.read_exact(file, whole, off) {
                return Some(Err(e));
            }
            whole
        };
        for b in bufs.iter_mut() {
            let (head, rest) = all.split_at_checked(b.len())?;
            b.copy_from_slice(head);
            all = rest;
        }
        Some(Ok(()))
    }

    /// A vectored read whose buffers are each aligned (offset, length and memory, as a
    /// guest's pages are) as one `preadv(2)` straight into them, as qemu reads guest
    /// memory with `O_DIRECT`: no bounce buffer, no copy. `None` when a buffer is not
    /// aligned, there are more than `IOV_MAX` of them, or the read comes up short or is
    /// interrupted (the caller then reads through the bounce buffer, which handles the
    /// end of the file).
    fn read_aligned(
        &self,
        file: &File,
        bufs: &mut [io::IoSliceMut<'_>],
        off: u64,
    ) -> Option<io::Result<()>> {
        if bufs.len() > 1024 {
            return None;
        }
        let mut at = off;
        for b in bufs.iter() {
            if !self.fits(b.as_ptr(), at, b.len()) {
                return None;
            }
            at = at.checked_add(b.len() as u64)?;
        }
        let guard = self.overlay_guard();
        match rustix::io::preadv(file, bufs, off) {
            Ok(n) if n as u64 == at - off => {}
            Ok(_) | Err(rustix::io::Errno::INTR) => return None,
            Err(e) => return Some(Err(e.into())),
        }
        if guard.is_some() {
            self.overlay(bufs.iter_mut().map(|b| &mut **b), off);
        }
        Some(Ok(()))
    }

    /// A vectored write gathered into one aligned buffer and written as one request (see
    /// [`Self::read_gathered`]); `None` in the same cases.
    pub(crate) fn write_gathered(
        &self,
        file: &File,
        bufs: &[io::IoSlice<'_>],
        off: u64,
    ) -> Option<io::Result<()>> {
        let len = gather_len(bufs.iter().map(|b| b.len()))?;
        if let Some(r) = self.write_aligned_vectored(file, bufs, off) {
            return Some(r);
        }
        let mut bounce = Aligned::new(len, self.mem_align);
        let whole = bounce.get(len);
        let mut at = 0usize;
        for b in bufs {
            let end = at.checked_add(b.len())?;
            whole.get_mut(at..end)?.copy_from_slice(b);
            at = end;
        }
        Some(self.write_all(file, whole, off))
    }
}

impl DirectIo {
    /// A vectored write whose buffers are each aligned (offset, length and memory, as a
    /// guest's pages are) as one `pwritev(2)` straight from them, as qemu writes guest
    /// memory with `O_DIRECT`: the write twin of [`Self::read_aligned`]. Cached blocks
    /// the write covers take its bytes first, as in [`Self::write_all`]. `None` (nothing
    /// written) when a buffer is not aligned or there are more than `IOV_MAX` of them;
    /// a short write is finished buffer by buffer.
    pub(super) fn write_aligned_vectored(
        &self,
        file: &File,
        bufs: &[io::IoSlice<'_>],
        off: u64,
    ) -> Option<io::Result<()>> {
        if bufs.len() > 1024 {
            return None;
        }
        let mut at = off;
        for b in bufs {
            if !self.fits(b.as_ptr(), at, b.len()) {
                return None;
            }
            at = at.checked_add(b.len() as u64)?;
        }
        let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
        {
            let mut dirty = self.dirty();
            if !dirty.is_empty() {
                let mut at = off;
                for b in bufs {
                    dirty.update(b, at, self.align);
                    at += b.len() as u64;
                }
            }
        }
        let done = match rustix::io::pwritev(file, bufs, off) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => 0,
            Err(e) => return Some(Err(e.into())),
        };
        // The rest (a short write): buffer by buffer, each aligned.
        let mut at = off;
        for b in bufs {
            let end = at + b.len() as u64;
            let written = (off + done as u64).clamp(at, end);
            if written < end {
                let from = usize::try_from(written - at).ok()?;
                if let Err(e) = file.write_all_at(b.get(from..)?, written) {
                    return Some(Err(e));
                }
            }
            at = end;
        }
        Some(Ok(()))
    }
}

/// The total of a vectored request worth gathering: two buffers or more, at most
/// [`GATHER_MAX`] bytes.
fn gather_len(lens: impl ExactSizeIterator<Item = usize>) -> Option<usize> {
    if lens.len() < 2 {
        return None;
    }
    let mut total = 0usize;
    for n in lens {
        total = total.checked_add(n).filter(|&t| t <= GATHER_MAX)?;
    }
    Some(total)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::indexing_slicing)]
#[path = "direct_tests.rs"]
mod tests;
