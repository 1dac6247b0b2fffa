//! The file type identifier, the two headers and the region table (MS-VHDX 2.2).

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Result, Storage};

use crate::format::{
    BAT_GUID, FILE_SIGNATURE, FMT, Guid, HEADER_SIGNATURE, HEADER1_OFFSET, HEADER2_OFFSET, KIB64,
    METADATA_GUID, MIB, REGION_SIGNATURE, REGION1_OFFSET, REGION2_OFFSET, checksum, set_checksum,
};

/// Size of one header structure covered by its checksum (MS-VHDX 2.2.2).
pub(crate) const HEADER_SIZE: usize = 4096;
/// Size of a region table (MS-VHDX 2.2.3).
pub(crate) const REGION_TABLE_SIZE: usize = 64 << 10;
/// Most region table entries (MS-VHDX 2.2.3.1).
const MAX_REGIONS: u32 = 2047;

/// The file type identifier at offset 0 (MS-VHDX 2.2.1): signature and creator.
pub(crate) fn file_identifier(creator: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 64 << 10];
    buf.put(0, FILE_SIGNATURE);
    // Creator: up to 256 UTF-16 code units at offset 8.
    for (i, unit) in creator.encode_utf16().take(255).enumerate() {
        buf.put_le_u16(8 + 2 * i, unit);
    }
    buf
}

/// True when `storage` starts with the "vhdxfile" signature.
pub(crate) fn has_signature(storage: &dyn Storage) -> bool {
    let mut sig = [0u8; 8];
    storage.read_exact_at(&mut sig, 0).is_ok() && &sig == FILE_SIGNATURE
}

/// One VHDX header (MS-VHDX 2.2.2). The raw 4 KiB are kept so reserved bytes survive
/// rewrites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// `SequenceNumber` (offset 8): the header with the larger one is current.
    pub(crate) sequence: u64,
    /// `FileWriteGuid` (offset 16): changed on the first write after open.
    pub(crate) file_write_guid: Guid,
    /// `DataWriteGuid` (offset 32): changed on the first user-visible data write.
    pub(crate) data_write_guid: Guid,
    /// `LogGuid` (offset 48): zero when the log is empty; otherwise log entries with this
    /// GUID must be replayed.
    pub(crate) log_guid: Guid,
    /// `LogVersion` (offset 64), must be 0.
    pub(crate) log_version: u16,
    /// `Version` (offset 66), must be 1.
    pub(crate) version: u16,
    /// `LogLength` (offset 68), a multiple of 1 MiB.
    pub(crate) log_length: u32,
    /// `LogOffset` (offset 72), a multiple of 1 MiB.
    pub(crate) log_offset: u64,
    raw: Vec<u8>,
}

impl Header {
    /// A fresh header for a new image.
    pub(crate) fn new(sequence: u64, log_offset: u64, log_length: u32) -> Self {
        Header {
            sequence,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length,
            log_offset,
            raw: vec![0u8; HEADER_SIZE],
        }
    }

    /// Parses and validates (signature, checksum) one header copy.
    pub(crate) fn parse(buf: &[u8]) -> Option<Header> {
        if buf.len() != HEADER_SIZE || buf.get(0..4)? != HEADER_SIGNATURE {
            return None;
        }
        if checksum(buf, 4) != buf.le_u32(4)? {
            return None;
        }
        Some(Header {
            sequence: buf.le_u64(8)?,
            file_write_guid: Guid(buf.array_at(16)?),
            data_write_guid: Guid(buf.array_at(32)?),
            log_guid: Guid(buf.array_at(48)?),
            log_version: buf.le_u16(64)?,
            version: buf.le_u16(66)?,
            log_length: buf.le_u32(68)?,
            log_offset: buf.le_u64(72)?,
            raw: buf.to_vec(),
        })
    }

    /// The 4 KiB on-disk form with a fresh checksum.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.raw.clone();
        b.resize(HEADER_SIZE, 0);
        b.put(0, HEADER_SIGNATURE);
        b.put_le_u64(8, self.sequence);
        b.put(16, &self.file_write_guid.0);
        b.put(32, &self.data_write_guid.0);
        b.put(48, &self.log_guid.0);
        b.put_le_u16(64, self.log_version);
        b.put_le_u16(66, self.version);
        b.put_le_u32(68, self.log_length);
        b.put_le_u64(72, self.log_offset);
        set_checksum(&mut b, 4);
        b
    }
}

/// Host offset of header slot `slot` (0 or 1).
pub(crate) fn header_offset(slot: usize) -> u64 {
    if slot == 0 {
        HEADER1_OFFSET
    } else {
        HEADER2_OFFSET
    }
}

/// Reads both headers and returns the current one (valid, highest sequence number)
/// with its slot. Fails when neither copy is valid or the version is unknown.
pub(crate) fn read_current_header(storage: &dyn Storage) -> Result<(Header, usize)> {
    let mut best: Option<(Header, usize)> = None;
    for slot in 0..2 {
        let mut buf = vec![0u8; HEADER_SIZE];
        if storage
            .read_exact_at(&mut buf, header_offset(slot))
            .is_err()
        {
            continue;
        }
        if let Some(h) = Header::parse(&buf) {
            let better = best.as_ref().is_none_or(|(b, _)| h.sequence > b.sequence);
            if better {
                best = Some((h, slot));
            }
        }
    }
    let (h, slot) =
        best.ok_or_else(|| Error::corrupt(FMT, "no valid VHDX header", HEADER1_OFFSET))?;
    if h.version != 1 {
        return Err(Error::unsupported(
            FMT,
            format!("VHDX version {} (only version 1 is supported)", h.version),
        ));
    }
    if h.log_version != 0 {
        return Err(Error::unsupported(
            FMT,
            format!("VHDX log version {}", h.log_version),
        ));
    }
    if !h.log_offset.is_multiple_of(MIB)
        || !u64::from(h.log_length).is_multiple_of(MIB)
        || h.log_offset < MIB
        || h.log_offset > crate::format::MAX_HOST_OFFSET
    {
        return Err(Error::corrupt(
            FMT,
            "log offset or length not aligned to 1 MiB",
            header_offset(slot),
        ));
    }
    Ok((h, slot))
}

/// One region table entry (MS-VHDX 2.2.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    /// `Guid`: which region (BAT, metadata, or unknown).
    pub(crate) guid: Guid,
    /// `FileOffset`: 1 MiB aligned.
    pub(crate) offset: u64,
    /// `Length`: a multiple of 1 MiB.
    pub(crate) length: u32,
    /// `Required` (bit 0): a parser that does not know the region must fail.
    pub(crate) required: bool,
}

/// The BAT and metadata regions of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Regions {
    /// The BAT region.
    pub(crate) bat: Region,
    /// The metadata region.
    pub(crate) metadata: Region,
}

/// Parses one region table copy (signature, checksum, entries).
fn parse_region_table(buf: &[u8], at: u64, log: (u64, u64)) -> Result<Option<Regions>> {
    if buf.get(0..4) != Some(REGION_SIGNATURE.as_slice()) || buf.le_u32(4) != Some(checksum(buf, 4))
    {
        return Ok(None);
    }
    let count = buf.le_u32(8).unwrap_or(u32::MAX);
    if count > MAX_REGIONS {
        return Err(Error::corrupt(FMT, "too many region table entries", at + 8));
    }
    let mut bat = None;
    let mut metadata = None;
    // qemu (`vhdx_region_check`): the log and every region, in table order, must not
    // overlap any one registered before it.
    let mut seen = vec![(log.0, log.0.saturating_add(log.1))];
    for i in 0..usize::try_from(count).unwrap_or(0) {
        let off = 16 + 32 * i;
        let bad = || Error::corrupt(FMT, "region table entry out of bounds", at);
        let r = Region {
            guid: Guid(buf.array_at(off).ok_or_else(bad)?),
            offset: buf.le_u64(off + 16).ok_or_else(bad)?,
            length: buf.le_u32(off + 24).ok_or_else(bad)?,
            required: buf.le_u32(off + 28).ok_or_else(bad)? & 1 != 0,
        };
        let entry_at = at + u64::try_from(off).unwrap_or(0);
        if !r.offset.is_multiple_of(MIB)
            || !u64::from(r.length).is_multiple_of(MIB)
            || r.offset < MIB
            || r.offset > crate::format::MAX_HOST_OFFSET
        {
            return Err(Error::corrupt(FMT, "region not aligned to 1 MiB", entry_at));
        }
        let (start, end) = (r.offset, r.offset.saturating_add(u64::from(r.length)));
        if let Some((a, b)) = seen.iter().find(|&&(a, b)| start < b && a < end) {
            return Err(Error::corrupt(
                FMT,
                format!("VHDX region {start}-{end} overlaps with region {a}-{b}"),
                entry_at,
            ));
        }
        seen.push((start, end));
        let slot = if r.guid == BAT_GUID {
            &mut bat
        } else if r.guid == METADATA_GUID {
            &mut metadata
        } else if r.required {
            return Err(Error::unsupported(FMT, "unknown required region"));
        } else {
            continue;
        };
        if slot.replace(r).is_some() {
            return Err(Error::corrupt(
                FMT,
                "duplicate region table entry",
                entry_at,
            ));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => {
            if bat.length == 0 || metadata.length == 0 {
                return Err(Error::corrupt(FMT, "empty BAT or metadata region", at));
            }
            Ok(Some(Regions { bat, metadata }))
        }
        _ => Err(Error::corrupt(
            FMT,
            "region table lacks the BAT or metadata region",
            at,
        )),
    }
}

/// Reads the region table, falling back to the second copy when the first is invalid.
/// `log` (offset, length) is the current header's log, which no region may overlap.
pub(crate) fn read_regions(storage: &dyn Storage, log: (u64, u64)) -> Result<Regions> {
    let mut first_err = None;
    for at in [REGION1_OFFSET, REGION2_OFFSET] {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        if storage.read_exact_at(&mut buf, at).is_err() {
            continue;
        }
        match parse_region_table(&buf, at, log) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| Error::corrupt(FMT, "no valid region table", REGION1_OFFSET)))
}

/// The 64 KiB region table naming `regions`.
pub(crate) fn region_table_bytes(regions: &Regions) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b.put(0, REGION_SIGNATURE);
    b.put_le_u32(8, 2);
    for (i, r) in [regions.bat, regions.metadata].iter().enumerate() {
        let off = 16 + 32 * i;
        b.put(off, &r.guid.0);
        b.put_le_u64(off + 16, r.offset);
        b.put_le_u32(off + 24, r.length);
        b.put_le_u32(off + 28, u32::from(r.required));
    }
    set_checksum(&mut b, 4);
    b
}

/// Size of the fixed part at the start of every file (identifier, headers, regions).
pub(crate) const FIXED_AREA: u64 = 5 * KIB64;

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checksum() {
        let h = Header::new(5, MIB, 1 << 20);
        let b = h.to_bytes();
        let back = Header::parse(&b).unwrap();
        assert_eq!((back.sequence, back.log_offset), (h.sequence, h.log_offset));
        assert!(back.to_bytes() == b);
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert_eq!(Header::parse(&bad), None);
    }

    #[test]
    fn region_table_round_trip() {
        let r = Regions {
            bat: Region {
                guid: BAT_GUID,
                offset: 2 * MIB,
                length: 1 << 20,
                required: true,
            },
            metadata: Region {
                guid: METADATA_GUID,
                offset: 3 * MIB,
                length: 1 << 20,
                required: true,
            },
        };
        let b = region_table_bytes(&r);
        assert_eq!(parse_region_table(&b, 0, (MIB, MIB)).unwrap(), Some(r));
        // A log over the BAT region: qemu's message.
        let e = parse_region_table(&b, 0, (2 * MIB, 2 * MIB)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VHDX region 2097152-3145728 overlaps with region 2097152-4194304"
        );
    }
}
