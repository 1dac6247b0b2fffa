//! The metadata log (MS-VHDX 2.3): finding the active sequence to replay, and building
//! the entries our own metadata updates go through.
//!
//! Entries are 4 KiB sectors: a header sector (or more) with the entry header and its
//! descriptors, then one data sector per data descriptor. The log is circular; the
//! active sequence is the run of valid entries with consecutive sequence numbers that
//! ends at the valid entry with the highest sequence number and starts at that entry's
//! `Tail`. Torn or invalid entries (bad checksum, foreign log GUID) are ignored.

use std::collections::BTreeMap;

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Limits, Result, Storage};

use crate::format::{
    DATA_DESC_SIGNATURE, DATA_SECTOR_SIGNATURE, FMT, Guid, LOG_ENTRY_SIGNATURE, LOG_SECTOR, MIB,
    ZERO_DESC_SIGNATURE, checksum, set_checksum,
};
use crate::header::Header;

/// Size of the entry header (MS-VHDX 2.3.1.1).
const ENTRY_HEADER: usize = 64;
/// Size of one descriptor (MS-VHDX 2.3.1.2, 2.3.1.3).
const DESC_SIZE: usize = 32;
/// 4096 as a usize.
const SECTOR: usize = 4096;

/// One change a log entry makes to the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Data descriptor + data sector: 4 KiB to write at a 4 KiB aligned file offset.
    Data {
        /// `FileOffset`.
        offset: u64,
        /// The sector's new content (leading bytes, data, trailing bytes reassembled).
        data: Vec<u8>,
    },
    /// Zero descriptor: `length` zero bytes at `offset`.
    Zero {
        /// `FileOffset`.
        offset: u64,
        /// `ZeroLength`.
        length: u64,
    },
}

/// A valid log entry (MS-VHDX 2.3.1.1).
#[derive(Clone, Debug)]
struct Entry {
    /// `EntryLength`.
    length: u64,
    /// `Tail`: log offset of the first entry of this entry's sequence.
    tail: u64,
    /// `SequenceNumber`.
    sequence: u64,
    /// `FlushedFileOffset`: the file was at least this long when the entry was written.
    flushed_file_offset: u64,
    /// `LastFileOffset`: every structure fits below this.
    last_file_offset: u64,
    changes: Vec<Change>,
}

/// What replaying the active sequence does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Replay {
    /// Changes in order.
    pub(crate) changes: Vec<Change>,
    /// The file must be at least this long afterwards.
    pub(crate) last_file_offset: u64,
    /// Highest sequence number seen.
    pub(crate) sequence: u64,
}

/// Reads `len` bytes at log offset `off`, wrapping around the end of the log.
fn circular(log: &[u8], off: u64, len: usize) -> Option<Vec<u8>> {
    let n = log.len();
    if len > n || n == 0 {
        return None;
    }
    let start = usize::try_from(off).ok()? % n;
    let mut out = log.get(start..n.min(start.checked_add(len)?))?.to_vec();
    let rest = len - out.len();
    out.extend_from_slice(log.get(..rest)?);
    Some(out)
}

/// Parses and validates the entry starting at log offset `off`, adding the bytes it
/// copies and checksums to `spent`.
fn parse_entry(log: &[u8], off: u64, guid: Guid, spent: &mut u64) -> Option<Entry> {
    let log_len = u64::try_from(log.len()).ok()?;
    let hdr = circular(log, off, ENTRY_HEADER)?;
    if hdr.get(0..4)? != LOG_ENTRY_SIGNATURE || Guid(hdr.array_at(32)?) != guid {
        return None;
    }
    let length = u64::from(hdr.le_u32(8)?);
    let tail = u64::from(hdr.le_u32(12)?);
    let sequence = hdr.le_u64(16)?;
    let count = usize::try_from(hdr.le_u32(24)?).ok()?;
    if length == 0
        || !length.is_multiple_of(LOG_SECTOR)
        || length > log_len
        || !tail.is_multiple_of(LOG_SECTOR)
    {
        return None;
    }
    if tail >= log_len {
        return None;
    }
    // Cheap consistency checks before the checksum over the whole entry: the entry is
    // exactly its header sectors plus one sector per data descriptor.
    let header_bytes = ENTRY_HEADER.checked_add(count.checked_mul(DESC_SIZE)?)?;
    let header_sectors = header_bytes.div_ceil(SECTOR);
    let length_us = usize::try_from(length).ok()?;
    if header_sectors.checked_mul(SECTOR)? > length_us {
        return None;
    }
    *spent = spent.saturating_add(header_bytes as u64);
    let descs = circular(log, off, header_bytes)?;
    let data_count = (0..count)
        .filter(|i| {
            descs.get(ENTRY_HEADER + i * DESC_SIZE..ENTRY_HEADER + i * DESC_SIZE + 4)
                == Some(DATA_DESC_SIGNATURE.as_slice())
        })
        .count();
    if (header_sectors + data_count).checked_mul(SECTOR)? != length_us {
        return None;
    }
    *spent = spent.saturating_add(length);
    let entry = circular(log, off, length_us)?;
    if checksum(&entry, 4) != hdr.le_u32(4)? {
        return None;
    }
    let mut data_sector = header_sectors;
    let mut changes = Vec::new();
    for i in 0..count {
        let d = ENTRY_HEADER + i * DESC_SIZE;
        let sig = entry.get(d..d + 4)?;
        let file_offset = entry.le_u64(d + 16)?;
        if entry.le_u64(d + 24)? != sequence || !file_offset.is_multiple_of(LOG_SECTOR) {
            return None;
        }
        if sig == ZERO_DESC_SIGNATURE {
            let length = entry.le_u64(d + 8)?;
            if !length.is_multiple_of(LOG_SECTOR) {
                return None;
            }
            file_offset.checked_add(length)?;
            changes.push(Change::Zero {
                offset: file_offset,
                length,
            });
        } else if sig == DATA_DESC_SIGNATURE {
            let s = data_sector.checked_mul(SECTOR)?;
            let sector = entry.get(s..s.checked_add(SECTOR)?)?;
            data_sector += 1;
            if sector.get(0..4)? != DATA_SECTOR_SIGNATURE
                || u64::from(sector.le_u32(4)?) != sequence >> 32
                || u64::from(sector.le_u32(4092)?) != sequence & 0xffff_ffff
            {
                return None;
            }
            let mut data = Vec::new();
            data.extend_from_slice(&entry.le_u64(d + 8)?.to_le_bytes());
            data.extend_from_slice(sector.get(8..4092)?);
            data.extend_from_slice(&entry.le_u32(d + 4)?.to_le_bytes());
            file_offset.checked_add(LOG_SECTOR)?;
            changes.push(Change::Data {
                offset: file_offset,
                data,
            });
        } else {
            return None;
        }
    }
    if u64::try_from(data_sector.checked_mul(SECTOR)?).ok()? > length {
        return None;
    }
    Some(Entry {
        length,
        tail,
        sequence,
        flushed_file_offset: hdr.le_u64(48)?,
        last_file_offset: hdr.le_u64(56)?,
        changes,
    })
}

/// Bytes the search of a log of `log_length` bytes may copy and checksum (and walk, a
/// sector a step). Every candidate entry is checksummed over its whole length, and
/// candidates may overlap: a hostile log whose every sector starts an entry spanning
/// most of the log costs time quadratic in its size. A real log is checksummed about
/// once (valid entries are skipped over whole, a torn one costs itself once), so eight
/// times the log plus 16 MiB is never reached by one.
fn search_budget(log_length: u32) -> u64 {
    u64::from(log_length)
        .saturating_mul(8)
        .saturating_add(16 * MIB)
}

fn too_costly(header: &Header) -> Error {
    Error::corrupt(
        FMT,
        "log entries overlap too much to search (more than eight times the log checksummed)",
        header.log_offset,
    )
}

/// Finds what must be replayed for `header` (None when the log is empty or holds no
/// valid entry). `file_len` is the current file size (a log whose entries claim a larger
/// flushed size means the file was truncated).
pub(crate) fn find_replay(
    storage: &dyn Storage,
    header: &Header,
    file_len: u64,
    limits: &Limits,
) -> Result<Option<Replay>> {
    if header.log_guid.is_zero() || header.log_length == 0 {
        return Ok(None);
    }
    // In the file before it is allocated: memory proportional to the file.
    let mut log = limits.alloc_in_file(
        FMT,
        "VHDX log",
        header.log_offset,
        u64::from(header.log_length),
        file_len,
    )?;
    storage.read_exact_at(&mut log, header.log_offset)?;
    let mut valid: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut off = 0u64;
    let mut spent = 0u64;
    let budget = search_budget(header.log_length);
    while off < u64::from(header.log_length) {
        if spent > budget {
            return Err(too_costly(header));
        }
        match parse_entry(&log, off, header.log_guid, &mut spent) {
            Some(e) => {
                // Valid entries do not overlap: continue after this one.
                let len = e.length;
                valid.insert(off, e);
                off += len;
            }
            None => off += LOG_SECTOR,
        }
    }
    let mut heads: Vec<(u64, u64)> = valid.iter().map(|(o, e)| (e.sequence, *o)).collect();
    heads.sort_unstable_by(|a, b| b.cmp(a));
    let log_len = u64::from(header.log_length);
    for (_, head_off) in heads {
        let Some(head) = valid.get(&head_off) else {
            continue;
        };
        // Walk from the head's tail to the head with consecutive sequence numbers.
        let mut seq_entries: Vec<&Entry> = Vec::new();
        let mut pos = head.tail;
        let mut ok = false;
        for _ in 0..=valid.len() {
            // Each step costs a sector of the budget: walks from many heads over one
            // long run are quadratic in the number of entries.
            spent = spent.saturating_add(LOG_SECTOR);
            if spent > budget {
                return Err(too_costly(header));
            }
            let Some(e) = valid.get(&pos) else { break };
            if let Some(prev) = seq_entries.last()
                && prev.sequence.checked_add(1) != Some(e.sequence)
            {
                break;
            }
            seq_entries.push(e);
            if pos == head_off && e.sequence == head.sequence {
                ok = true;
                break;
            }
            pos = (pos + e.length) % log_len;
        }
        if !ok {
            continue;
        }
        if file_len < head.flushed_file_offset {
            return Err(Error::corrupt(
                FMT,
                "log entry records a larger file size: the image was truncated",
                header.log_offset + head_off,
            ));
        }
        let max_end = file_len.max(head.last_file_offset);
        let log_end = header.log_offset + u64::from(header.log_length);
        let mut changes = Vec::new();
        for e in &seq_entries {
            for c in &e.changes {
                let (start, end) = match c {
                    Change::Data { offset, .. } => (*offset, offset.checked_add(LOG_SECTOR)),
                    Change::Zero { offset, length } => (*offset, offset.checked_add(*length)),
                };
                let at = header.log_offset + head_off;
                let Some(end) = end.filter(|&end| end <= max_end) else {
                    return Err(Error::corrupt(
                        FMT,
                        "log entry writes beyond the end of the file",
                        at,
                    ));
                };
                // The log updates metadata (BAT, metadata region, sector bitmaps); never
                // the headers and region tables (the header section) or the log itself.
                if start < MIB || (start < log_end && header.log_offset < end) {
                    return Err(Error::corrupt(
                        FMT,
                        "log entry writes into the header section or the log",
                        at,
                    ));
                }
                changes.push(c.clone());
            }
        }
        return Ok(Some(Replay {
            changes,
            last_file_offset: head.last_file_offset,
            sequence: head.sequence,
        }));
    }
    Ok(None)
}

/// Applies `replay` to `storage` (writes, then growth to `LastFileOffset`), without
/// flushing.
pub(crate) fn apply(storage: &dyn Storage, replay: &Replay) -> Result<()> {
    for c in &replay.changes {
        match c {
            Change::Data { offset, data } => storage.write_all_at(data, *offset)?,
            Change::Zero { offset, length } => storage.write_zeroes(*offset, *length)?,
        }
    }
    if storage.len()? < replay.last_file_offset {
        storage.set_len(replay.last_file_offset)?;
    }
    Ok(())
}

/// Parameters of one entry we write.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EntryParams {
    /// The log GUID in the header.
    pub(crate) guid: Guid,
    /// Sequence number of this entry.
    pub(crate) sequence: u64,
    /// Log offset of the first entry of the sequence.
    pub(crate) tail: u64,
    /// Current (flushed) file size.
    pub(crate) file_size: u64,
}

/// Builds one log entry writing `sectors` (4 KiB aligned offsets, 4 KiB contents).
pub(crate) fn build_entry(p: EntryParams, sectors: &[(u64, Vec<u8>)]) -> Result<Vec<u8>> {
    let n = sectors.len();
    let header_sectors = (ENTRY_HEADER + n * DESC_SIZE).div_ceil(SECTOR);
    let total = (header_sectors + n) * SECTOR;
    let mut e = vec![0u8; total];
    let too_big = || Error::internal("log entry too large");
    e.put(0, LOG_ENTRY_SIGNATURE);
    e.put_le_u32(8, u32::try_from(total).map_err(|_| too_big())?);
    e.put_le_u32(12, u32::try_from(p.tail).map_err(|_| too_big())?);
    e.put_le_u64(16, p.sequence);
    e.put_le_u32(24, u32::try_from(n).map_err(|_| too_big())?);
    e.put(32, &p.guid.0);
    e.put_le_u64(48, p.file_size);
    e.put_le_u64(56, p.file_size);
    for (i, (offset, data)) in sectors.iter().enumerate() {
        if data.len() != SECTOR {
            return Err(Error::internal("log sector must be 4 KiB"));
        }
        let d = ENTRY_HEADER + i * DESC_SIZE;
        e.put(d, DATA_DESC_SIGNATURE);
        e.put(d + 4, data.get(4092..).unwrap_or(&[]));
        e.put(d + 8, data.get(..8).unwrap_or(&[]));
        e.put_le_u64(d + 16, *offset);
        e.put_le_u64(d + 24, p.sequence);
        let s = (header_sectors + i) * SECTOR;
        e.put(s, DATA_SECTOR_SIGNATURE);
        e.put_le_u32(s + 4, u32::try_from(p.sequence >> 32).unwrap_or(0));
        e.put(s + 8, data.get(8..4092).unwrap_or(&[]));
        e.put_le_u32(
            s + 4092,
            u32::try_from(p.sequence & 0xffff_ffff).unwrap_or(0),
        );
    }
    set_checksum(&mut e, 4);
    Ok(e)
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;

    #[test]
    fn built_entries_parse_back_and_wrap() {
        let guid = Guid::random();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let p = EntryParams {
            guid,
            sequence: 0x1_0000_0005,
            tail: 12288,
            file_size: 8 << 20,
        };
        let e = build_entry(p, &[(1 << 20, data.clone())]).unwrap();
        assert_eq!(e.len(), 8192);
        // Place it wrapping around the end of a 16 KiB log.
        let mut log = vec![0u8; 16384];
        log[12288..].copy_from_slice(&e[..4096]);
        log[..4096].copy_from_slice(&e[4096..]);
        let parsed = parse_entry(&log, 12288, guid, &mut 0).unwrap();
        assert_eq!(parsed.sequence, 0x1_0000_0005);
        assert_eq!(
            parsed.changes,
            vec![Change::Data {
                offset: 1 << 20,
                data
            }]
        );
        assert!(parse_entry(&log, 12288, Guid::random(), &mut 0).is_none());
        log[100] ^= 1;
        assert!(parse_entry(&log, 12288, guid, &mut 0).is_none());
    }
}
