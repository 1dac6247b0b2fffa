//! Growing dynamic, differencing and fixed images (qemu cannot resize VHDX at all).
//!
//! A fixed image gets its new blocks allocated (FULLY_PRESENT, after the last block, read
//! as zeroes; `preallocation=falloc|full` reserves them) before the log commit.
//! The BAT region keeps its place and size: growth is possible while the new entries
//! fit in it (images we create round the BAT up to whole MiB, which leaves room). The
//! new Virtual Disk Size and the (zeroed) new BAT entries are committed in one log
//! entry, so a crash leaves either the old or the new size.

use std::sync::atomic::Ordering;

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{Error, Preallocation, Result};

use crate::bat::{PAYLOAD_FULLY_PRESENT, make_entry};
use crate::device::{State, VhdxDevice};
use crate::format::{FMT, LOG_SECTOR};
use crate::metadata::MAX_VIRTUAL_SIZE;

impl VhdxDevice {
    /// Changes the virtual size to `new` (growth only).
    pub(crate) fn resize_locked(
        &self,
        st: &mut State,
        new: u64,
        prealloc: Preallocation,
        shrink: bool,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.closed.check()?;
        let old = self.size();
        if new == old {
            return Ok(());
        }
        if new < old {
            if !shrink {
                return Err(Error::invalid(
                    "Use the --shrink option to perform a shrink operation.",
                ));
            }
            return Err(Error::unsupported(FMT, "shrinking images"));
        }
        let fixed = self.meta.leave_blocks_allocated;
        // A fixed image allocates its new blocks, so it can preallocate them too.
        if !fixed && !matches!(prealloc, Preallocation::Off | Preallocation::Metadata) {
            return Err(Error::unsupported(FMT, "preallocated resize"));
        }
        if new > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid("Image size too large; max of 64TB"));
        }
        if !new.is_multiple_of(self.geo.logical_sector) {
            return Err(Error::invalid(
                "The new size must be a multiple of the logical sector size",
            ));
        }
        if self.meta.virtual_size_at == 0 {
            return Err(Error::unsupported(
                FMT,
                "resize without a virtual size item",
            ));
        }
        let has_parent = self.meta.has_parent;
        let old_geo = self.geo.for_size(old, has_parent);
        let new_geo = self.geo.for_size(new, has_parent);
        let need = new_geo
            .entries
            .checked_mul(8)
            .ok_or(Error::invalid("image too large"))?;
        if need > u64::from(self.regions.bat.length) {
            return Err(Error::unsupported(
                FMT,
                "growing beyond the capacity of the BAT region",
            ));
        }
        self.grow_bat_buffer(st, need.next_multiple_of(LOG_SECTOR))?;
        // The old last block's bytes beyond the old end become visible: zero them.
        let bs = self.geo.block_size;
        let tail_end = old.next_multiple_of(bs).min(new);
        if tail_end > old {
            self.zero_locked(st, old, tail_end - old)?;
        }
        self.start_session(st)?;
        let mut sectors: Vec<(u64, Vec<u8>)> = Vec::new();
        // Entries that become part of the table must read as NOT_PRESENT.
        for i in old_geo.entries..new_geo.entries {
            if st.entry(i) != 0 {
                let s = self.set_entry(st, i, 0)?;
                Self::add_sector(&mut sectors, s);
            }
        }
        if fixed {
            // Fixed: every new block FULLY_PRESENT, placed after the last one (zeroes:
            // the file grows), durable before the log commit points the BAT at it.
            let count = new_geo.data_blocks.saturating_sub(old_geo.data_blocks);
            let len = count
                .checked_mul(bs)
                .ok_or(Error::invalid("image too large"))?;
            if len > 0 {
                let at = self.allocate(st, len)?;
                if matches!(prealloc, Preallocation::Falloc | Preallocation::Full) {
                    self.storage.preallocate(at, len, prealloc)?;
                }
                self.storage.flush()?;
                for (k, b) in (old_geo.data_blocks..new_geo.data_blocks).enumerate() {
                    let off = at + k as u64 * bs;
                    let e = make_entry(PAYLOAD_FULLY_PRESENT, off);
                    let s = self.set_entry(st, new_geo.payload_index(b), e)?;
                    Self::add_sector(&mut sectors, s);
                }
            }
        }
        let at = self.meta.virtual_size_at;
        let sector = at / LOG_SECTOR * LOG_SECTOR;
        let mut data = vec![0u8; 4096];
        self.storage.read_exact_at(&mut data, sector)?;
        let pos = usize::try_from(at - sector).unwrap_or(0);
        if !data.put_le_u64(pos, new) {
            return Err(Error::corrupt(FMT, "virtual size item misplaced", at));
        }
        sectors.push((sector, data));
        self.commit(st, sectors)?;
        self.size.store(new, Ordering::Release);
        Ok(())
    }

    /// Extends the in-memory BAT to `len` bytes (reading them from the region).
    fn grow_bat_buffer(&self, st: &mut State, len: u64) -> Result<()> {
        let have = st.bat.len() as u64;
        if len <= have {
            return Ok(());
        }
        let mut extra = vec![0u8; usize::try_from(len - have).unwrap_or(0)];
        self.storage
            .read_exact_at(&mut extra, self.regions.bat.offset + have)?;
        st.bat.extend_from_slice(&extra);
        Ok(())
    }
}
