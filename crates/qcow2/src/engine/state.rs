//! [`Meta`]'s state as the device and the features see it: read access to the header, the
//! L1 table, the snapshots and the storages, and the named changes features make to them
//! (a new L1 table, a new snapshot table, header fields written in place). Meta's fields
//! stay private to the engine, so the header in memory changes only together with the
//! disk (or at open, from it).

use std::sync::Arc;

use diskimg_blockio::{Limits, Result, Storage};

use crate::disk::header::{AUTOCLEAR_AT, CRYPT_METHOD_AT, Header, INCOMPAT_DIRTY, INCOMPATIBLE_AT};
use crate::disk::snapshot::Snapshot;
use crate::disk::table::encode_u64s;
use crate::engine::meta::Meta;

/// Byte offset of the guest size in the header.
const SIZE_AT: u64 = 24;

impl Meta {
    /// The image file.
    pub(crate) fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// The external data file, when the image has one.
    pub(crate) fn data(&self) -> Option<&Arc<dyn Storage>> {
        self.data.as_ref()
    }

    /// The header as last written (or read at open).
    pub(crate) fn h(&self) -> &Header {
        &self.h
    }

    /// The L1 table in use (active, or a snapshot's).
    pub(crate) fn l1(&self) -> &[u64] {
        &self.l1
    }

    /// Where the L1 table in use lives.
    pub(crate) fn l1_offset(&self) -> u64 {
        self.l1_offset
    }

    /// The image's host epoch (see `epoch`).
    pub(crate) fn epoch(&self) -> &crate::engine::epoch::HostEpoch {
        &self.epoch
    }

    /// Uses `other`'s host epoch (a snapshot view of the same image).
    pub(crate) fn share_epoch(&mut self, other: &Meta) {
        self.epoch = other.epoch.clone();
    }

    /// Guest size of the view.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Resource limits.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// The internal snapshots (table order).
    pub(crate) fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Bytes of the snapshot table.
    pub(crate) fn snapshot_table_len(&self) -> u64 {
        self.snapshot_table_len
    }

    /// Sets the guest size of the view (the device keeps a lock-free copy: callers go
    /// through `Qcow2Device::set_size`, or build a view not yet shared).
    pub(crate) fn set_size(&mut self, size: u64) {
        self.size = size;
    }

    /// Reads the L1 table of `n` entries at `off` and makes it the one in use.
    pub(crate) fn load_l1(&mut self, what: &'static str, off: u64, n: u64) -> Result<()> {
        self.l1 = self.read_table(what, off, n)?;
        self.l1_offset = off;
        Ok(())
    }

    /// Writes `table` over the L1 table in use (same place and length) and uses it.
    pub(crate) fn write_l1(&mut self, table: Vec<u64>) -> Result<()> {
        self.file
            .write_all_at(&encode_u64s(&table), self.l1_offset)?;
        self.file.flush()?;
        self.l1 = table;
        Ok(())
    }

    /// Uses `table`, already written at `off` and recorded in the header on disk, as
    /// the active L1 table (the old one is the caller's to free).
    pub(crate) fn replace_l1(&mut self, table: Vec<u64>, off: u64) {
        self.h.l1_table_offset = off;
        self.h.l1_size = u32::try_from(table.len()).unwrap_or(u32::MAX);
        self.l1 = table;
        self.l1_offset = off;
    }

    /// The snapshots read at open, with the table's length in bytes.
    pub(crate) fn set_snapshots(&mut self, snapshots: Vec<Snapshot>, table_len: u64) {
        self.snapshots = snapshots;
        self.snapshot_table_len = table_len;
    }

    /// Uses `snapshots`, whose table of `table_len` bytes the caller wrote at `off` and
    /// recorded (count and offset) in the header on disk.
    pub(crate) fn replace_snapshots(&mut self, snapshots: Vec<Snapshot>, off: u64, table_len: u64) {
        self.h.nb_snapshots = u32::try_from(snapshots.len()).unwrap_or(u32::MAX);
        self.h.snapshots_offset = off;
        self.snapshot_table_len = table_len;
        self.snapshots = snapshots;
    }

    /// Writes the guest size into the header (then flushes).
    pub(crate) fn write_header_size(&mut self, size: u64) -> Result<()> {
        self.file.write_all_at(&size.to_be_bytes(), SIZE_AT)?;
        self.file.flush()?;
        self.h.size = size;
        Ok(())
    }

    /// Writes the incompatible feature bits into the header, between flushes.
    pub(crate) fn write_incompatible(&mut self, bits: u64) -> Result<()> {
        if bits & INCOMPAT_DIRTY == 0 {
            // Refcounts held while dirty (see `lazy`) must be durable before it clears.
            self.write_held()?;
        }
        self.file.flush()?;
        self.file
            .write_all_at(&bits.to_be_bytes(), INCOMPATIBLE_AT)?;
        self.file.flush()?;
        self.h.incompatible = bits;
        Ok(())
    }

    /// Writes the autoclear feature bits into the header (then flushes).
    pub(crate) fn write_autoclear(&mut self, bits: u64) -> Result<()> {
        self.h.autoclear = bits;
        self.file.write_all_at(&bits.to_be_bytes(), AUTOCLEAR_AT)?;
        self.file.flush()
    }

    /// Records encryption in the header: `method`, and the LUKS header area when there
    /// is one; writes the extensions and the method between flushes.
    pub(crate) fn write_crypt(&mut self, method: u32, area: Option<(u64, u64)>) -> Result<()> {
        if area.is_some() {
            self.h.ext.crypto = area;
        }
        self.h.crypt_method = method;
        self.file.flush()?;
        let ext = self.h.ext.serialise(self.h.version);
        self.file
            .write_all_at(&ext, u64::from(self.h.header_length))?;
        self.file
            .write_all_at(&method.to_be_bytes(), CRYPT_METHOD_AT)?;
        self.file.flush()
    }
}
