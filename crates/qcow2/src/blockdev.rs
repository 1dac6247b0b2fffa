//! The [`BlockDevice`] methods of [`Qcow2Device`]: each checks what every format checks
//! and hands over to the module doing the work (`read.rs`, `write.rs`,
//! `compressed_write.rs`, `offload.rs`, `features/`).

use std::any::Any;
use std::io::IoSlice;
use std::sync::Arc;

use diskimg_blockio::{
    Amend, BackingRef, Bitmaps, BlockDevice, ChainLink, CheckReport, CompressedUnits, DeviceInfo,
    Error, Extent, Preallocation, RepairMode, Result, RunFn, Snapshots, Storage, ZeroFlags,
    check_range,
    vectored::{total_len, write_each},
};

use crate::device::Qcow2Device;
use crate::disk::header::INCOMPAT_DIRTY;
use crate::invalid_entry::Request;

impl Drop for Qcow2Device {
    /// Writes deferred metadata and the persistent dirty bitmaps, as closing an image in
    /// qemu does (errors are ignored: call [`Qcow2Device::close`] to see them).
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl BlockDevice for Qcow2Device {
    fn info(&self) -> DeviceInfo {
        let m = self.lock();
        let mut info = DeviceInfo::new("qcow2", m.size());
        info.cluster_size = Some(m.cs());
        info.read_only = self.read_only;
        info.dirty = m.h().incompatible & INCOMPAT_DIRTY != 0;
        info.encrypted = m.h().crypt_method != 0;
        info.backing = m
            .h()
            .backing_file
            .as_ref()
            .map(|b| BackingRef::new(b.clone(), m.h().ext.backing_format.clone()));
        info.format_specific = Some(("qcow2", self.format_specific(&m)));
        info.snapshots = m.snapshots().iter().map(|s| s.info.clone()).collect();
        info
    }

    fn virtual_size(&self) -> u64 {
        self.size()
    }

    /// Through the shared guest-I/O skeleton (`read.rs`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self.read_guest(buf, offset);
        self.signal_invalid(r, offset, buf.len() as u64, Request::Read)
    }

    /// The read path's walk (`read.rs`), for vectored reads and the async face.
    fn walk_runs(&self, offset: u64, len: u64, f: &mut RunFn<'_>) -> Result<bool> {
        let r = self.walk_guest(offset, len, f);
        self.signal_invalid(r, offset, len, Request::Read)
    }

    /// The image's count (`engine::epoch`) plus its backing device's, whose runs the
    /// walk reports for unallocated ranges (`None` when the backing cannot tell).
    fn host_epoch(&self) -> Option<u64> {
        self.backing_epoch
            .host_epoch(self.epoch.get(), || self.backing())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        self.mark_dirty(offset, buf.len() as u64);
        let r = crate::write::write(self, buf, offset);
        self.signal_invalid(r, offset, buf.len() as u64, Request::Write)
    }

    /// In place from the caller's buffers when it can (`overwrite_vectored.rs`), else
    /// gathered into `write_at`s as every format's default does.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.writable()?;
        let len = total_len(bufs.iter().map(|b| b.len()), offset)?;
        check_range(offset, len, self.virtual_size())?;
        self.mark_dirty(offset, len);
        if crate::overwrite_vectored::overwrite_vectored(self, bufs, offset)? {
            return Ok(());
        }
        write_each(self, bufs, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        self.mark_dirty(offset, len);
        let r = crate::write::write_zeroes(self, offset, len, flags.may_unmap);
        self.signal_invalid(r, offset, len, Request::Write)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        self.mark_dirty(offset, len);
        crate::write::discard(self, offset, len)
    }

    /// [`Qcow2Device::close`].
    fn close(&self) -> Result<()> {
        Qcow2Device::close(self)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // The storage flushes run without the metadata lock (readers and writers go on).
        let generation = self.lock().guest_flush()?;
        if let Some(d) = &self.data {
            d.flush()?;
        }
        self.file.flush()?;
        self.lock().reserve_flushed(generation);
        Ok(())
    }

    /// Through the shared guest-I/O skeleton (`read.rs`): the same lookups as reads.
    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let r = self.map_guest(offset, len);
        self.signal_invalid(r, offset, len, Request::Read)
    }

    /// The external data file, which every host offset of `map` refers to.
    fn host_files(&self) -> Vec<String> {
        if self.data.is_none() {
            return Vec::new();
        }
        self.lock().h().ext.data_file.clone().into_iter().collect()
    }

    fn map_file(&self, _offset: u64) -> usize {
        usize::from(self.data.is_some())
    }

    fn compressed_write_granularity(&self) -> Option<u64> {
        (!self.read_only && self.data.is_none() && self.crypt.is_none()).then(|| self.lock().cs())
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        self.mark_dirty(offset, buf.len() as u64);
        crate::compressed_write::write_compressed(self, buf, offset)
    }

    fn compress_units(&self, buf: &[u8], offset: u64) -> Result<CompressedUnits> {
        self.writable()?;
        crate::compressed_write::compress_units(self, buf, offset)
    }

    fn write_compressed_units(&self, units: CompressedUnits) -> Result<()> {
        self.writable()?;
        check_range(units.offset, units.len, self.virtual_size())?;
        self.mark_dirty(units.offset, units.len);
        crate::compressed_write::write_units(self, units)
    }

    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) -> Result<()> {
        let present = backing.is_some();
        let old = std::mem::replace(
            &mut *self.backing.write().unwrap_or_else(|e| e.into_inner()),
            backing,
        );
        self.backing_epoch.replaced(old.as_deref(), present);
        Ok(())
    }

    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing()
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        self.writable()?;
        crate::features::resize::resize(self, new_size, prealloc, shrink, true)
    }

    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        if self.snapshot_view {
            return Err(Error::unsupported("qcow2", "checking a snapshot view"));
        }
        if repair != RepairMode::None {
            self.writable()?;
            let r = crate::features::check::check(self, repair);
            // Repairs rewrite refcounts and tables (the frees and rebuilds moved the
            // host epoch already; this covers entries a repair changed in place).
            self.epoch.bump();
            return r;
        }
        crate::features::check::check(self, repair)
    }

    /// The image file, or the external data file; `None` for encrypted images (their
    /// host bytes are ciphertext).
    fn data_storage(&self) -> Option<Arc<dyn Storage>> {
        if self.crypt.is_some() {
            return None;
        }
        Some(self.data.clone().unwrap_or_else(|| self.file.clone()))
    }

    /// Whole clusters are copied into their host clusters with
    /// [`copy_range`](diskimg_blockio::copy_range); see `offload.rs`.
    fn write_from(&self, offset: u64, len: u64, src: &dyn Storage, src_offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        self.mark_dirty(offset, len);
        crate::offload::write_from(self, offset, len, src, src_offset)
    }

    fn repaired_at_open(&self) -> Vec<String> {
        self.open_repairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn as_snapshots(&self) -> Option<&dyn Snapshots> {
        Some(self)
    }

    /// Version 3 images only (version 2 cannot hold bitmaps).
    fn as_bitmaps(&self) -> Option<&dyn Bitmaps> {
        (self.lock().h().version >= 3).then_some(self as &dyn Bitmaps)
    }

    fn as_amend(&self) -> Option<&dyn Amend> {
        Some(self)
    }

    fn as_chain_link(&self) -> Option<&dyn ChainLink> {
        Some(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
