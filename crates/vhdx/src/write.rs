//! Writes: block allocation, sector bitmap updates, and metadata changes through the
//! log.
//!
//! Ordering (every step that a later one depends on is flushed first):
//! 1. new payload or sector bitmap space is created at the 1 MiB aligned end of the
//!    file and the guest data written into it, then flushed;
//! 2. the changed 4 KiB metadata sectors (BAT, sector bitmap) go to the log as one
//!    entry (with a fresh log GUID in the header first, when the log was empty), flushed;
//! 3. the same sectors are written in place, flushed.
//!
//! A crash before 2 completes leaves the old metadata (the new space is leaked); after
//! it, replay at the next open redoes 3. A flush of the device marks the log empty again
//! (zero log GUID) so that the file is clean for other readers.

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{Error, Result};

use crate::bat::{
    PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNDEFINED,
    PAYLOAD_UNMAPPED, PAYLOAD_ZERO, SB_BLOCK_SIZE, SB_PRESENT, entry_offset, entry_state,
    make_entry,
};
use crate::device::{State, VhdxDevice};
use crate::format::{FMT, Guid, LOG_SECTOR};
use crate::header::{Header, header_offset};
use crate::layout::SECTOR_BITMAP;
use crate::log::{EntryParams, build_entry};

impl VhdxDevice {
    /// Writes the next header copy (sequence + 1) into the other slot and flushes.
    pub(crate) fn update_header(&self, st: &mut State, f: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = st.header.clone();
        h.sequence = h.sequence.wrapping_add(1);
        f(&mut h);
        let slot = 1 - st.slot.min(1);
        self.storage
            .write_all_at(&h.to_bytes(), header_offset(slot))?;
        self.storage.flush()?;
        st.header = h;
        st.slot = slot;
        Ok(())
    }

    /// Renews the write GUIDs before the first modification of this session.
    pub(crate) fn start_session(&self, st: &mut State) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.closed.check()?;
        if !st.session_started {
            self.update_header(st, |h| {
                h.file_write_guid = Guid::random();
                h.data_write_guid = Guid::random();
            })?;
            st.session_started = true;
        }
        Ok(())
    }

    /// Commits changed 4 KiB metadata sectors through the log (see module docs).
    pub(crate) fn commit(&self, st: &mut State, sectors: Vec<(u64, Vec<u8>)>) -> Result<()> {
        if sectors.is_empty() {
            return Ok(());
        }
        let log_len = u64::from(st.header.log_length);
        if !st.log_active {
            // A fresh GUID per activation: entries of any earlier log never match.
            self.update_header(st, |h| h.log_guid = Guid::random())?;
            st.log_head = 0;
            st.log_sequence = 1;
            st.log_active = true;
        }
        let file_size = self.storage.len()?;
        let params = EntryParams {
            guid: st.header.log_guid,
            sequence: st.log_sequence,
            tail: 0,
            file_size,
        };
        let probe = build_entry(params, &sectors)?;
        let entry_len = probe.len() as u64;
        if entry_len > log_len {
            return Err(Error::unsupported(
                FMT,
                "metadata update larger than the log",
            ));
        }
        if st.log_head + entry_len > log_len {
            st.log_head = 0;
        }
        // Each entry is a sequence of its own (everything before it is applied).
        let entry = build_entry(
            EntryParams {
                tail: st.log_head,
                ..params
            },
            &sectors,
        )?;
        self.storage
            .write_all_at(&entry, st.header.log_offset + st.log_head)?;
        self.storage.flush()?;
        for (off, data) in &sectors {
            self.storage.write_all_at(data, *off)?;
        }
        self.storage.flush()?;
        st.log_head = (st.log_head + entry_len) % log_len;
        st.log_sequence += 1;
        Ok(())
    }

    /// Sets BAT entry `i` in memory and returns its 4 KiB sector for [`Self::commit`].
    pub(crate) fn set_entry(&self, st: &mut State, i: u64, value: u64) -> Result<(u64, Vec<u8>)> {
        let pos = usize::try_from(i * 8).map_err(|_| Error::internal("BAT index"))?;
        if !st.bat.put_le_u64(pos, value) {
            return Err(Error::internal("BAT index out of range"));
        }
        let sector = pos / 4096 * 4096;
        let data = st
            .bat
            .get(sector..sector + 4096)
            .ok_or(Error::internal("BAT index out of range"))?
            .to_vec();
        Ok((self.regions.bat.offset + sector as u64, data))
    }

    /// Adds or replaces a sector in a pending commit list.
    pub(crate) fn add_sector(list: &mut Vec<(u64, Vec<u8>)>, s: (u64, Vec<u8>)) {
        list.retain(|(o, _)| *o != s.0);
        list.push(s);
    }

    /// Grows the file by `len` zeroed bytes at the aligned end; returns the offset.
    pub(crate) fn allocate(&self, st: &mut State, len: u64) -> Result<u64> {
        let at = st
            .file_end
            .max(self.storage.len()?.next_multiple_of(1 << 20));
        let end = at
            .checked_add(len)
            .ok_or(Error::invalid("file too large"))?;
        self.storage.set_len(end)?;
        st.file_end = end;
        Ok(at)
    }

    /// Writes `data` at guest `offset` (any alignment).
    pub(crate) fn write_locked(&self, st: &mut State, data: &[u8], offset: u64) -> Result<()> {
        self.start_session(st)?;
        let bs = self.geo.block_size;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_off = pos % bs;
            let n = usize::try_from((bs - in_off).min((data.len() - done) as u64)).unwrap_or(0);
            let chunk = data.get(done..done + n).unwrap_or(&[]);
            self.write_in_block(st, pos / bs, in_off, chunk)?;
            done += n.max(1);
        }
        Ok(())
    }

    fn write_in_block(&self, st: &mut State, block: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let idx = self.geo.payload_index(block);
        let e = st.entry(idx);
        let off = entry_offset(e);
        let state = entry_state(e);
        let bs = self.geo.block_size;
        let whole = in_off == 0
            && (data.len() as u64 == bs
                || (block * bs).saturating_add(data.len() as u64) >= self.size());
        match state {
            PAYLOAD_FULLY_PRESENT if off != 0 => {
                st.meta.guard_write(FMT, off + in_off, data.len() as u64)?;
                self.storage.write_all_at(data, off + in_off)?;
                Ok(())
            }
            PAYLOAD_PARTIALLY_PRESENT | PAYLOAD_NOT_PRESENT if self.meta.has_parent && !whole => {
                self.write_partial(st, block, in_off, data)
            }
            PAYLOAD_PARTIALLY_PRESENT if off != 0 => {
                // Overwritten entirely: the block becomes fully present where it is.
                st.meta.guard_write(FMT, off, data.len() as u64)?;
                self.storage.write_all_at(data, off)?;
                self.storage.flush()?;
                let s = self.set_entry(st, idx, make_entry(PAYLOAD_FULLY_PRESENT, off))?;
                self.commit(st, vec![s])
            }
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                // New block: zero-filled space, the data, flush, then the BAT entry.
                let at = self.allocate(st, self.geo.block_size)?;
                self.storage.write_all_at(data, at + in_off)?;
                self.storage.flush()?;
                let s = self.set_entry(st, idx, make_entry(PAYLOAD_FULLY_PRESENT, at))?;
                self.commit(st, vec![s])
            }
            _ => Err(Error::corrupt(
                FMT,
                "invalid BAT entry",
                self.regions.bat.offset,
            )),
        }
    }

    /// A write into a differencing block that is not fully present: sector-align it
    /// (taking the other bytes of the edge sectors from the current content), store it in
    /// the block, and mark the sectors present in the sector bitmap.
    fn write_partial(&self, st: &mut State, block: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let ls = self.geo.logical_sector;
        let bs = self.geo.block_size;
        let start = in_off / ls * ls;
        let end = (in_off + data.len() as u64).next_multiple_of(ls).min(bs);
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        let guest = block * bs;
        let head = usize::try_from(in_off - start).unwrap_or(0);
        if head != 0 || buf.len() != data.len() {
            // Read the edge sectors as they read now.
            let ls_us = usize::try_from(ls).unwrap_or(512);
            let last = buf.len().saturating_sub(ls_us);
            for at in [0, last] {
                let size = self.size();
                let g = guest + start + at as u64;
                if let Some(s) = buf.get_mut(at..at + ls_us) {
                    let n = usize::try_from(size.saturating_sub(g).min(ls)).unwrap_or(0);
                    if let Some(s) = s.get_mut(..n) {
                        self.read_locked(st, s, g)?;
                    }
                }
            }
        }
        buf.put(head, data);
        let mut sectors = Vec::new();
        let idx = self.geo.payload_index(block);
        let e = st.entry(idx);
        let mut block_off = entry_offset(e);
        let new_block = entry_state(e) != PAYLOAD_PARTIALLY_PRESENT;
        if !new_block && block_off == 0 {
            return Err(Error::corrupt(
                FMT,
                "invalid BAT entry",
                self.regions.bat.offset,
            ));
        }
        let sb_idx = self.geo.bitmap_index(block);
        let sb = st.entry(sb_idx);
        let mut sb_off = entry_offset(sb);
        let new_sb = entry_state(sb) != SB_PRESENT || sb_off == 0;
        // Refuse before allocating anything: a bitmap block over other metadata, or an
        // existing block over metadata (both let through by a `check` open only).
        if !new_sb && !st.meta.covers(sb_off, SB_BLOCK_SIZE, SECTOR_BITMAP) {
            return Err(Error::corrupt(
                FMT,
                "sector bitmap update would overwrite metadata",
                sb_off,
            ));
        }
        if new_block {
            block_off = self.allocate(st, bs)?;
        }
        st.meta
            .guard_write(FMT, block_off + start, buf.len() as u64)?;
        if new_sb {
            sb_off = self.allocate(st, SB_BLOCK_SIZE)?;
            st.meta
                .insert(sb_off, SB_BLOCK_SIZE, SECTOR_BITMAP)
                .map_err(|o| o.to_error(FMT))?;
        }
        self.storage.write_all_at(&buf, block_off + start)?;
        self.storage.flush()?;
        // Sector bitmap sectors with the new bits.
        let first = self.geo.bitmap_first_sector(block) + start / ls;
        let count = (end - start) / ls;
        let byte0 = first / 8 / LOG_SECTOR * LOG_SECTOR;
        let byte1 = (first + count).div_ceil(8).next_multiple_of(LOG_SECTOR);
        let mut bm = vec![0u8; usize::try_from(byte1 - byte0).unwrap_or(0)];
        self.storage.read_exact_at(&mut bm, sb_off + byte0)?;
        for s in first..first + count {
            let bit = s - byte0 * 8;
            if let Some(b) = bm.get_mut(usize::try_from(bit / 8).unwrap_or(usize::MAX)) {
                *b |= 1 << (bit % 8);
            }
        }
        for (i, c) in bm.chunks(4096).enumerate() {
            sectors.push((sb_off + byte0 + i as u64 * LOG_SECTOR, c.to_vec()));
        }
        if new_sb {
            let s = self.set_entry(st, sb_idx, make_entry(SB_PRESENT, sb_off))?;
            Self::add_sector(&mut sectors, s);
        }
        if new_block {
            let s = self.set_entry(st, idx, make_entry(PAYLOAD_PARTIALLY_PRESENT, block_off))?;
            Self::add_sector(&mut sectors, s);
        }
        self.commit(st, sectors)
    }

    /// Sets whole blocks to `state` (zeroes or unmapped) through the log.
    fn set_block_state(&self, st: &mut State, block: u64, state: u8) -> Result<()> {
        let idx = self.geo.payload_index(block);
        let e = st.entry(idx);
        if entry_state(e) == state {
            return Ok(());
        }
        let s = self.set_entry(st, idx, make_entry(state, 0))?;
        self.commit(st, vec![s])
    }

    /// write_zeroes: fully present blocks are zeroed in place (host `write_zeroes`, no
    /// metadata change and no leaked space, like qemu's zero writes); whole blocks that
    /// are not allocated become `PAYLOAD_BLOCK_ZERO` unless they already read as zeroes;
    /// other partial ranges are written with zeroes.
    pub(crate) fn zero_locked(&self, st: &mut State, offset: u64, len: u64) -> Result<()> {
        self.start_session(st)?;
        let bs = self.geo.block_size;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / bs;
            let in_off = pos % bs;
            let n = (bs - in_off).min(end - pos);
            let whole = in_off == 0 && (n == bs || pos + n >= self.size());
            let e = st.entry(self.geo.payload_index(block));
            let off = entry_offset(e);
            let reads_zero = match entry_state(e) {
                PAYLOAD_ZERO | PAYLOAD_UNDEFINED | PAYLOAD_UNMAPPED => true,
                PAYLOAD_NOT_PRESENT => !self.meta.has_parent,
                _ => false,
            };
            if entry_state(e) == PAYLOAD_FULLY_PRESENT && off != 0 {
                st.meta.guard_write(FMT, off + in_off, n)?;
                self.storage.write_zeroes(off + in_off, n)?;
            } else if reads_zero {
                // Nothing to do.
            } else if whole {
                self.set_block_state(st, block, PAYLOAD_ZERO)?;
            } else {
                let z = vec![0u8; usize::try_from(n).unwrap_or(0)];
                self.write_in_block(st, block, in_off, &z)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// True when `len` bytes at `offset` lie in fully present blocks, so a write needs no
    /// metadata change (and can run under the shared lock).
    pub(crate) fn all_present(&self, st: &State, offset: u64, len: u64) -> bool {
        let bs = self.geo.block_size;
        let first = offset / bs;
        let last = (offset + len.max(1) - 1) / bs;
        st.session_started
            && (first..=last).all(|b| {
                let e = st.entry(self.geo.payload_index(b));
                entry_state(e) == PAYLOAD_FULLY_PRESENT && entry_offset(e) != 0
            })
    }

    /// Writes into fully present blocks only (see [`Self::all_present`]).
    pub(crate) fn write_present(&self, st: &State, data: &[u8], offset: u64) -> Result<()> {
        let bs = self.geo.block_size;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_off = pos % bs;
            let n = usize::try_from((bs - in_off).min((data.len() - done) as u64)).unwrap_or(0);
            let e = st.entry(self.geo.payload_index(pos / bs));
            let chunk = data.get(done..done + n).unwrap_or(&[]);
            let host = entry_offset(e) + in_off;
            st.meta.guard_write(FMT, host, chunk.len() as u64)?;
            self.storage.write_all_at(chunk, host)?;
            done += n.max(1);
        }
        Ok(())
    }

    /// Flushes data, then marks the log empty (zero log GUID) if it was used.
    pub(crate) fn flush_locked(&self, st: &mut State) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.flush()?;
        if st.log_active {
            self.update_header(st, |h| h.log_guid = Guid::ZERO)?;
            st.log_active = false;
        }
        Ok(())
    }
}
