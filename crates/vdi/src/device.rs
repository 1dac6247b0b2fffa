//! [`VdiDevice`]: guest reads and writes through the block map.
//!
//! Reads and writes to allocated blocks run under a shared lock; a write that needs a new
//! block takes the exclusive lock, writes the block's data (whole block, zero-padded,
//! unless it lies beyond the end of the file), flushes, and only then commits the block
//! map entry and allocated count together ([`Meta::commit`]). A crash at any point
//! leaves either the old map or the new one, never an entry pointing at unwritten data.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use diskimg_blockio::{
    BlockDevice, CheckReport, DeviceInfo, Error, Extent, Holes, HostRun, Layout, Limits, Mapping,
    PastEof, Preallocation, RepairMode, Result, Storage, ZeroFlags, check_range, map_via, read_via,
};

use crate::bmap::{Meta, is_allocated};
use crate::header::{BLOCK_SIZE, FORMAT};
use crate::uuid::Uuid;

/// An open VDI image.
#[derive(Debug)]
pub struct VdiDevice {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) meta: RwLock<Meta>,
    pub(crate) read_only: bool,
    pub(crate) closed: diskimg_blockio::Closed,
    pub(crate) limits: Limits,
    /// Set once the modification UUID was renewed for this session.
    modified: AtomicBool,
    /// The host epoch ([`BlockDevice::host_epoch`]): moved when growing the image moves
    /// blocks out of the grown block map's way (`resize.rs`), the only time host bytes
    /// of a block stop being its home (blocks are allocated past the used ones, never
    /// freed; VDI has no discard).
    pub(crate) epoch: AtomicU64,
}

/// One piece of a guest request that stays inside one block.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    block: u64,
    in_block: u64,
    len: usize,
    buf_off: usize,
}

fn chunks(offset: u64, len: usize) -> impl Iterator<Item = Chunk> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let in_block = pos % BLOCK_SIZE;
        let n = usize::try_from((BLOCK_SIZE - in_block).min((len - done) as u64)).ok()?;
        let c = Chunk {
            block: pos / BLOCK_SIZE,
            in_block,
            len: n,
            buf_off: done,
        };
        done += n;
        Some(c)
    })
}

impl VdiDevice {
    /// Opens an image on `storage`.
    pub fn open(storage: Arc<dyn Storage>, read_only: bool, limits: Limits) -> Result<Self> {
        let meta = Meta::load(&storage, &limits)?;
        Ok(Self {
            read_only: read_only || storage.is_read_only(),
            closed: diskimg_blockio::Closed::new(),
            storage,
            meta: RwLock::new(meta),
            limits,
            modified: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        })
    }

    fn view(&self) -> View<'_> {
        View {
            storage: self.storage.as_ref(),
            m: self.read_meta(),
        }
    }

    pub(crate) fn read_meta(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write_meta(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.closed.check()?;
        if let Some(why) = self.read_meta().write_block {
            return Err(Error::unsupported(
                FORMAT,
                format!("writing this image: {why}"),
            ));
        }
        Ok(())
    }

    /// True for a fixed (static, `-o static=on`) image.
    pub fn is_static(&self) -> bool {
        self.read_meta().header.is_static()
    }

    /// The image's creation UUID.
    pub fn image_uuid(&self) -> Option<Uuid> {
        let m = self.read_meta();
        m.header.image_uuid(&m.prefix)
    }

    /// The image's last-modification UUID (renewed on the first write of a session, as
    /// VirtualBox does).
    pub fn modification_uuid(&self) -> Option<Uuid> {
        let m = self.read_meta();
        m.header.modify_uuid(&m.prefix)
    }

    /// Renews the modification UUID once per session (a one-sector header write, which
    /// also brings the allocated count in line with the map).
    fn mark_modified(&self) -> Result<()> {
        if self.modified.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.write_meta();
        if self.modified.load(Ordering::Acquire) {
            return Ok(());
        }
        let header = m.header.clone();
        header.store_modify_uuid(&mut m.prefix, Uuid::random());
        m.commit(self.storage.as_ref(), None)?;
        self.modified.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes `data` at `in_block` of a newly reserved data index.
    fn write_new_block(&self, host: u64, in_block: u64, data: &[u8]) -> Result<()> {
        let file_len = self.storage.len()?;
        let block_end = host
            .checked_add(BLOCK_SIZE)
            .ok_or_else(|| Error::corrupt_unplaced(FORMAT, "data block offset overflow"))?;
        if host >= file_len {
            // Fresh space reads as zeroes: grow the file and write only the data.
            self.storage.set_len(block_end)?;
            return self.storage.write_all_at(data, host + in_block);
        }
        // Possibly a block leaked by a crash: overwrite all of it.
        let mut block = vec![0u8; usize::try_from(BLOCK_SIZE).unwrap_or(0)];
        let start = usize::try_from(in_block).unwrap_or(0);
        if let Some(dst) = block.get_mut(start..start.saturating_add(data.len())) {
            dst.copy_from_slice(data);
        }
        self.storage.write_all_at(&block, host)
    }

    /// The write path when at least one block needs allocating (exclusive lock held).
    fn write_allocating(&self, m: &mut Meta, buf: &[u8], offset: u64) -> Result<()> {
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        let result = (|| {
            for c in chunks(offset, buf.len()) {
                let data = buf.get(c.buf_off..c.buf_off + c.len).unwrap_or(&[]);
                let e = m.entry(c.block);
                if is_allocated(e) {
                    let host = m.host_offset(u64::from(e))? + c.in_block;
                    self.storage.write_all_at(data, host)?;
                    continue;
                }
                if let Some(&(_, idx)) = fresh.iter().find(|(g, _)| *g == c.block) {
                    let host = m.host_offset(idx)? + c.in_block;
                    self.storage.write_all_at(data, host)?;
                    continue;
                }
                let idx = m.alloc_index()?;
                fresh.push((c.block, idx));
                let host = m.host_offset(idx)?;
                self.write_new_block(host, c.in_block, data)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for &(_, idx) in &fresh {
                m.unreserve(idx);
            }
            return Err(e);
        }
        if fresh.is_empty() {
            return Ok(());
        }
        // The new entries take effect in memory now; on disk they are written by the
        // next flush, after the data (see `commit_pending`).
        let mut upto = 0;
        for &(g, idx) in &fresh {
            let v = u32::try_from(idx).map_err(|_| Error::internal("vdi block index overflow"))?;
            m.set_entry(g, v)?;
            m.counted += 1;
            upto = upto.max(g);
        }
        m.pending_upto = Some(m.pending_upto.map_or(upto, |p| p.max(upto)));
        Ok(())
    }

    /// Writes the block map entries allocated since the last flush: the data is made
    /// durable first, then the header (allocated count) and the map up to the highest
    /// new entry go out in one write. Until then a crash loses only unflushed writes
    /// (their blocks, appended at the end of the file, are unreferenced). Deferring
    /// costs one `fdatasync` and one map write per flush instead of per new block, and
    /// keeps the map write (which starts at the header) from growing with every
    /// allocation in a large image.
    pub(crate) fn commit_pending(&self, m: &mut Meta) -> Result<()> {
        let Some(upto) = m.pending_upto else {
            return Ok(());
        };
        self.storage.flush()?;
        if let Err(e) = m.commit(self.storage.as_ref(), Some(upto)) {
            // The on-disk state is now unknown: refuse further writes.
            m.write_block = Some("a metadata write failed");
            return Err(e);
        }
        m.pending_upto = None;
        Ok(())
    }
}

/// The block map under its read lock, for [`read_via`] and [`map_via`].
struct View<'a> {
    storage: &'a dyn Storage,
    m: RwLockReadGuard<'a, Meta>,
}

impl Layout for View<'_> {
    fn size(&self) -> u64 {
        self.m.header.disk_size
    }

    /// An allocated block is a host run (the part past the end of the file reads as
    /// zeroes; a static image's host holes map as zeroes, as qemu's file layer reports
    /// them); unallocated blocks read as zeroes (VDI has no backing files).
    fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
        let end = offset.saturating_add(max);
        let in_block = offset % BLOCK_SIZE;
        let e = self.m.entry(offset / BLOCK_SIZE);
        let mut stop = offset - in_block + BLOCK_SIZE;
        if is_allocated(e) {
            let host = self.m.host_offset(u64::from(e))? + in_block;
            let run = HostRun::new(self.storage, host)
                .past_eof(PastEof::Zero)
                .holes(if self.m.header.is_static() {
                    Holes::DataZero
                } else {
                    Holes::Ignored
                });
            return Ok((Mapping::Host(run), stop.min(end) - offset));
        }
        while stop < end && !is_allocated(self.m.entry(stop / BLOCK_SIZE)) {
            stop += BLOCK_SIZE;
        }
        Ok((Mapping::Zero { host: None }, stop.min(end) - offset))
    }
}

impl Drop for VdiDevice {
    /// Writes pending block map entries (errors are ignored: flush or close first to
    /// see them).
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.flush();
        }
    }
}

impl BlockDevice for VdiDevice {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(FORMAT, self.virtual_size());
        info.cluster_size = Some(BLOCK_SIZE);
        info.read_only = self.read_only;
        info
    }

    fn virtual_size(&self) -> u64 {
        self.read_meta().header.disk_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_via(&self.view(), buf, offset)
    }

    fn walk_runs(&self, offset: u64, len: u64, f: &mut diskimg_blockio::RunFn<'_>) -> Result<bool> {
        diskimg_blockio::walk(&self.view(), offset, len, f)
    }

    /// A count moved only when growing the image moves data blocks out of the grown
    /// block map's way (`resize.rs`); VDI has no backing file.
    fn host_epoch(&self) -> Option<u64> {
        Some(self.epoch.load(Ordering::SeqCst))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.mark_modified()?;
        {
            let m = self.read_meta();
            check_range(offset, buf.len() as u64, m.header.disk_size)?;
            let all_allocated = chunks(offset, buf.len()).all(|c| is_allocated(m.entry(c.block)));
            if all_allocated {
                for c in chunks(offset, buf.len()) {
                    let data = buf.get(c.buf_off..c.buf_off + c.len).unwrap_or(&[]);
                    let host = m.host_offset(u64::from(m.entry(c.block)))? + c.in_block;
                    self.storage.write_all_at(data, host)?;
                }
                return Ok(());
            }
        }
        let mut m = self.write_meta();
        check_range(offset, buf.len() as u64, m.header.disk_size)?;
        self.write_allocating(&mut m, buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        if len == 0 {
            return Ok(());
        }
        self.mark_modified()?;
        let m = self.read_meta();
        check_range(offset, len, m.header.disk_size)?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let in_block = pos % BLOCK_SIZE;
            let n = (BLOCK_SIZE - in_block).min(end - pos);
            let e = m.entry(block);
            // Unallocated blocks already read as zeroes (VDI has no backing file).
            if is_allocated(e) {
                let host = m.host_offset(u64::from(e))? + in_block;
                self.storage.write_zeroes(host, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // As qemu: VDI has no discard; the data stays.
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.closed.check()?;
        check_range(offset, len, self.virtual_size())
    }

    fn close(&self) -> Result<()> {
        // One shared meaning (blockio::Closed): later writes are refused, a second
        // close does nothing.
        self.closed.close_with(self.read_only, || self.flush())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.commit_pending(&mut self.write_meta())?;
        self.storage.flush()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        map_via(&self.view(), offset, len)
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        crate::resize::resize(self, new_size, prealloc, shrink)
    }

    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        if repair != RepairMode::None {
            // qemu: -r on vdi is ENOTSUP ("This image format does not support checks").
            return Err(Error::unsupported(FORMAT, "checks"));
        }
        if !self.read_only {
            // The check reads the map from memory; make it the one on disk.
            self.commit_pending(&mut self.write_meta())?;
        }
        Ok(crate::check::check(&self.read_meta()))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_at_blocks() {
        let v: Vec<_> = chunks(BLOCK_SIZE - 10, 30).collect();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].len, 10);
        assert_eq!(v[1].block, 1);
        assert_eq!(v[1].in_block, 0);
        assert_eq!(v[1].buf_off, 10);
        assert_eq!(chunks(0, 0).count(), 0);
    }
}
