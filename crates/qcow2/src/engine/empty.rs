//! Emptying an image from scratch, as qemu's `make_completely_empty` does after a
//! commit: the L1 table and the first clusters are zeroed, the header points at a
//! one-cluster refcount table right after it, one refcount block after that and the L1
//! table after that, the clusters of those structures are refcounted, and the file is
//! cut behind them. The image is marked dirty meanwhile, so that a failure part way
//! (the refcounts are broken until the end) is repaired at the next open. The steps and
//! their order are qemu's, events included ([`DebugEvent`]), so a failing step leaves
//! the file as qemu's would (iotest 098).

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{DebugEvent, Result};

use crate::disk::header::INCOMPAT_DIRTY;
use crate::engine::meta::Meta;

/// Byte offset of `l1_table_offset` in the header (`refcount_table_offset` and
/// `refcount_table_clusters` follow it).
const L1_TABLE_OFFSET_AT: u64 = 40;

impl Meta {
    /// Whether qemu empties this image from scratch ([`Meta::empty_completely`]): a v3
    /// image without snapshots, bitmaps (`bitmaps`), LUKS encryption (`luks`) or data
    /// file, whose L1 table and three more clusters fit one refcount block.
    pub(crate) fn can_empty_completely(&self, bitmaps: bool, luks: bool) -> bool {
        let l1_clusters = (u64::from(self.h.l1_size) * 8).div_ceil(self.cs());
        self.h.version >= 3
            && self.snapshots.is_empty()
            && !bitmaps
            && !luks
            && self.data.is_none()
            && 3 + l1_clusters <= self.rb_entries()
    }

    /// Empties the image from scratch (see the module docs). On failure the metadata in
    /// memory no longer describes the file: the caller must stop using the image.
    pub(crate) fn empty_completely(&mut self) -> Result<()> {
        self.commit_deferred()?;
        self.release_reserve()?;
        self.file.flush()?;
        self.reset_l2_cache();
        self.rb.clear();
        self.write_incompatible(self.h.incompatible | INCOMPAT_DIRTY)?;
        let cs = self.cs();
        let l1_bytes = u64::from(self.h.l1_size) * 8;
        let l1_clusters = l1_bytes.div_ceil(cs);

        self.file.debug_event(DebugEvent::L1Update);
        self.file.write_zeroes(self.l1_offset, l1_clusters * cs)?;
        self.l1.iter_mut().for_each(|e| *e = 0);
        // Every data cluster is free from now on (the refcounts are rebuilt below).
        self.epoch.bump();

        self.file.debug_event(DebugEvent::EmptyImagePrepare);
        self.file.write_zeroes(cs, (2 + l1_clusters) * cs)?;

        self.file.debug_event(DebugEvent::L1Update);
        self.file.debug_event(DebugEvent::ReftableUpdate);
        let mut fields = [0u8; 20];
        fields.put_be_u64(0, 3 * cs);
        fields.put_be_u64(8, cs);
        fields.put_be_u32(16, 1);
        self.file.write_all_at(&fields, L1_TABLE_OFFSET_AT)?;
        self.file.flush()?;
        self.l1_offset = 3 * cs;
        self.h.l1_table_offset = 3 * cs;
        self.h.refcount_table_offset = cs;
        self.h.refcount_table_clusters = 1;
        self.reftable = vec![0; usize::try_from(cs / 8).unwrap_or(0)];

        self.file.debug_event(DebugEvent::RefblockAlloc);
        self.file.write_all_at(&(2 * cs).to_be_bytes(), cs)?;
        self.file.flush()?;
        if let Some(e) = self.reftable.first_mut() {
            *e = 2 * cs;
        }
        self.free_hint = 0;
        self.alloc_floor = 0;
        self.free_byte = 0;
        // Header, refcount table, refcount block and L1 table.
        self.set_refcount_run(0, (3 * cs + l1_bytes).div_ceil(cs), 1)?;

        self.write_incompatible(self.h.incompatible & !INCOMPAT_DIRTY)?;
        self.file.set_len((3 + l1_clusters) * cs)?;
        self.overlap.clear();
        self.collect_meta();
        Ok(())
    }
}
