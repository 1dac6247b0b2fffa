//! The metadata region (MS-VHDX 2.6): table, known items and the parent locator.

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Limits, Result, Storage};

use crate::format::{
    FILE_PARAMETERS_GUID, FMT, Guid, KIB64, LOGICAL_SECTOR_GUID, METADATA_SIGNATURE, MIB,
    PARENT_LOCATOR_GUID, PARENT_LOCATOR_TYPE_VHDX, PHYSICAL_SECTOR_GUID, VIRTUAL_DISK_ID_GUID,
    VIRTUAL_DISK_SIZE_GUID,
};
use crate::header::Region;

/// Most metadata table entries (MS-VHDX 2.6.1.1).
const MAX_ENTRIES: u16 = 2047;
/// Largest virtual disk size the format allows: 64 TiB (MS-VHDX 2.6.2.2).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// `IsRequired` flag of a metadata table entry (MS-VHDX 2.6.1.2).
const FLAG_REQUIRED: u32 = 4;
/// `IsVirtualDisk` flag of a metadata table entry (MS-VHDX 2.6.1.2).
const FLAG_VIRTUAL_DISK: u32 = 2;

/// The parent locator (MS-VHDX 2.6.2.6): key/value pairs naming the parent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ParentLocator {
    /// Entries in on-disk order (`parent_linkage`, `relative_path`, …).
    pub(crate) entries: Vec<(String, String)>,
    /// Host offset and byte length of the `parent_linkage` value, when read from a file
    /// (for relinking in place).
    pub(crate) linkage_at: Option<(u64, usize)>,
}

impl ParentLocator {
    /// The value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The parsed metadata items an image needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Metadata {
    /// File Parameters `BlockSize` (MS-VHDX 2.6.2.1): 1 MiB..256 MiB, a power of two.
    pub(crate) block_size: u32,
    /// File Parameters `LeaveBlocksAllocated` (bit 0): a fixed disk.
    pub(crate) leave_blocks_allocated: bool,
    /// File Parameters `HasParent` (bit 1): a differencing disk.
    pub(crate) has_parent: bool,
    /// Virtual Disk Size (MS-VHDX 2.6.2.2).
    pub(crate) virtual_size: u64,
    /// Host offset of the Virtual Disk Size item (0 when not read from a file).
    pub(crate) virtual_size_at: u64,
    /// Logical Sector Size (MS-VHDX 2.6.2.4): 512 or 4096.
    pub(crate) logical_sector: u32,
    /// Physical Sector Size (MS-VHDX 2.6.2.5): 512 or 4096.
    pub(crate) physical_sector: u32,
    /// Virtual Disk ID (MS-VHDX 2.6.2.3).
    pub(crate) disk_id: Guid,
    /// Parent Locator (MS-VHDX 2.6.2.6), required when `has_parent`.
    pub(crate) parent: Option<ParentLocator>,
}

fn utf16(buf: &[u8]) -> Option<String> {
    let units: Vec<u16> = buf
        .chunks(2)
        .map(|c| match c {
            [a, b] => Some(u16::from_le_bytes([*a, *b])),
            _ => None,
        })
        .collect::<Option<_>>()?;
    String::from_utf16(&units).ok()
}

fn parse_parent_locator(item: &[u8], at: u64) -> Result<ParentLocator> {
    let bad = || Error::corrupt(FMT, "invalid parent locator", at);
    let ty = Guid(item.array_at(0).ok_or_else(bad)?);
    if ty != PARENT_LOCATOR_TYPE_VHDX {
        return Err(Error::unsupported(FMT, "parent locator of an unknown type"));
    }
    let count = item.le_u16(18).ok_or_else(bad)?;
    let mut entries = Vec::new();
    let mut linkage_at = None;
    // Keys and values may point at the same bytes; decoding each would hold up to
    // 65535 x 2 x 64 KiB of strings for one small item. Real locators' entries are
    // disjoint, so together they are no longer than the item.
    let mut decoded = 0usize;
    for i in 0..usize::from(count) {
        let e = 20 + 12 * i;
        let ko = usize::try_from(item.le_u32(e).ok_or_else(bad)?).map_err(|_| bad())?;
        let vo = usize::try_from(item.le_u32(e + 4).ok_or_else(bad)?).map_err(|_| bad())?;
        let kl = usize::from(item.le_u16(e + 8).ok_or_else(bad)?);
        let vl = usize::from(item.le_u16(e + 10).ok_or_else(bad)?);
        decoded = decoded.saturating_add(kl).saturating_add(vl);
        if decoded > item.len() {
            return Err(Error::corrupt(
                FMT,
                "parent locator entries overlap (more key and value bytes than the item holds)",
                at,
            ));
        }
        let key = item.get(ko..ko.checked_add(kl).ok_or_else(bad)?);
        let val = item.get(vo..vo.checked_add(vl).ok_or_else(bad)?);
        let (Some(key), Some(val)) = (key.and_then(utf16), val.and_then(utf16)) else {
            return Err(bad());
        };
        if key == "parent_linkage" && linkage_at.is_none() {
            linkage_at = Some((at + vo as u64, vl));
        }
        entries.push((key, val));
    }
    Ok(ParentLocator {
        entries,
        linkage_at,
    })
}

/// Reads and validates the metadata region of a file `file_len` long (what lies past it
/// is refused before it is allocated).
pub(crate) fn read_metadata(
    storage: &dyn Storage,
    region: &Region,
    file_len: u64,
    limits: &Limits,
) -> Result<Metadata> {
    let at = region.offset;
    let region_len = u64::from(region.length);
    // Each structure is checked against the file before it is allocated.
    let mut table = limits.alloc_in_file(FMT, "VHDX metadata table", at, KIB64, file_len)?;
    storage.read_exact_at(&mut table, at)?;
    if table.get(0..8) != Some(METADATA_SIGNATURE.as_slice()) {
        return Err(Error::corrupt(FMT, "bad metadata table signature", at));
    }
    let count = table.le_u16(10).unwrap_or(u16::MAX);
    if count > MAX_ENTRIES {
        return Err(Error::corrupt(FMT, "too many metadata entries", at + 10));
    }
    let mut items: Vec<(Guid, Vec<u8>, u64)> = Vec::new();
    for i in 0..usize::from(count) {
        let e = 32 + 32 * i;
        let e_at = at + u64::try_from(e).unwrap_or(0);
        let bad = || Error::corrupt(FMT, "metadata entry out of bounds", e_at);
        let id = Guid(table.array_at(e).ok_or_else(bad)?);
        let off = u64::from(table.le_u32(e + 16).ok_or_else(bad)?);
        let len = u64::from(table.le_u32(e + 20).ok_or_else(bad)?);
        let flags = table.le_u32(e + 24).ok_or_else(bad)?;
        let known = [
            FILE_PARAMETERS_GUID,
            VIRTUAL_DISK_SIZE_GUID,
            VIRTUAL_DISK_ID_GUID,
            LOGICAL_SECTOR_GUID,
            PHYSICAL_SECTOR_GUID,
            PARENT_LOCATOR_GUID,
        ];
        if !known.contains(&id) {
            if flags & FLAG_REQUIRED != 0 {
                return Err(Error::unsupported(FMT, "unknown required metadata item"));
            }
            continue;
        }
        if items.iter().any(|(g, _, _)| *g == id) {
            return Err(Error::corrupt(FMT, "duplicate metadata item", e_at));
        }
        if off < KIB64 || off.checked_add(len).is_none_or(|end| end > region_len) {
            return Err(Error::corrupt(
                FMT,
                "metadata item outside its region",
                e_at,
            ));
        }
        let mut data = limits.alloc_in_file(FMT, "VHDX metadata item", at + off, len, file_len)?;
        storage.read_exact_at(&mut data, at + off)?;
        items.push((id, data, at + off));
    }
    let find = |g: Guid| items.iter().find(|(id, _, _)| *id == g);
    let missing = |what| Error::corrupt(FMT, what, at);
    let (_, fp, fp_at) =
        find(FILE_PARAMETERS_GUID).ok_or_else(|| missing("missing file parameters"))?;
    let block_size = fp
        .le_u32(0)
        .ok_or_else(|| missing("short file parameters"))?;
    let fp_flags = fp
        .le_u32(4)
        .ok_or_else(|| missing("short file parameters"))?;
    if !block_size.is_power_of_two() || !(1 << 20..=256 << 20).contains(&block_size) {
        return Err(Error::corrupt(FMT, "invalid block size", *fp_at));
    }
    let (_, vs, vs_at) =
        find(VIRTUAL_DISK_SIZE_GUID).ok_or_else(|| missing("missing virtual disk size"))?;
    let virtual_size = vs
        .le_u64(0)
        .ok_or_else(|| missing("short virtual disk size"))?;
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(Error::corrupt(FMT, "virtual disk size too large", *vs_at));
    }
    let sector = |g: Guid, what: &'static str| -> Result<u32> {
        let (_, b, b_at) = find(g).ok_or_else(|| missing(what))?;
        match b.le_u32(0) {
            Some(v @ (512 | 4096)) => Ok(v),
            _ => Err(Error::corrupt(FMT, "invalid sector size", *b_at)),
        }
    };
    let logical_sector = sector(LOGICAL_SECTOR_GUID, "missing logical sector size")?;
    let physical_sector = sector(PHYSICAL_SECTOR_GUID, "missing physical sector size")?;
    let disk_id = find(VIRTUAL_DISK_ID_GUID)
        .and_then(|(_, b, _)| b.array_at(0))
        .map(Guid)
        .unwrap_or_default();
    let has_parent = fp_flags & 2 != 0;
    let parent = match find(PARENT_LOCATOR_GUID) {
        Some((_, b, b_at)) if has_parent => Some(parse_parent_locator(b, *b_at)?),
        None if has_parent => return Err(missing("differencing image without parent locator")),
        _ => None,
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: fp_flags & 1 != 0,
        has_parent,
        virtual_size,
        virtual_size_at: *vs_at,
        logical_sector,
        physical_sector,
        disk_id,
        parent,
    })
}

fn utf16_bytes(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn parent_locator_bytes(p: &ParentLocator) -> Result<Vec<u8>> {
    let count = u16::try_from(p.entries.len()).map_err(|_| Error::invalid("too many keys"))?;
    let mut out = vec![0u8; 20 + 12 * p.entries.len()];
    out.put(0, &PARENT_LOCATOR_TYPE_VHDX.0);
    out.put_le_u16(18, count);
    for (i, (k, v)) in p.entries.iter().enumerate() {
        let (k, v) = (utf16_bytes(k), utf16_bytes(v));
        let too_long = || Error::invalid("parent locator entry too long");
        let ko = u32::try_from(out.len()).map_err(|_| too_long())?;
        out.extend_from_slice(&k);
        let vo = u32::try_from(out.len()).map_err(|_| too_long())?;
        out.extend_from_slice(&v);
        let e = 20 + 12 * i;
        out.put_le_u32(e, ko);
        out.put_le_u32(e + 4, vo);
        out.put_le_u16(e + 8, u16::try_from(k.len()).map_err(|_| too_long())?);
        out.put_le_u16(e + 10, u16::try_from(v.len()).map_err(|_| too_long())?);
    }
    Ok(out)
}

/// The metadata region (1 MiB) holding `m`.
pub(crate) fn metadata_region_bytes(m: &Metadata) -> Result<Vec<u8>> {
    let fp_flags = u32::from(m.leave_blocks_allocated) | (u32::from(m.has_parent) << 1);
    let mut items: Vec<(Guid, Vec<u8>, u32)> = vec![
        (
            FILE_PARAMETERS_GUID,
            [m.block_size.to_le_bytes(), fp_flags.to_le_bytes()].concat(),
            FLAG_REQUIRED,
        ),
        (
            VIRTUAL_DISK_SIZE_GUID,
            m.virtual_size.to_le_bytes().to_vec(),
            FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
        ),
        (
            VIRTUAL_DISK_ID_GUID,
            m.disk_id.0.to_vec(),
            FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
        ),
        (
            LOGICAL_SECTOR_GUID,
            m.logical_sector.to_le_bytes().to_vec(),
            FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
        ),
        (
            PHYSICAL_SECTOR_GUID,
            m.physical_sector.to_le_bytes().to_vec(),
            FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
        ),
    ];
    if let Some(p) = &m.parent {
        items.push((
            PARENT_LOCATOR_GUID,
            parent_locator_bytes(p)?,
            FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
        ));
    }
    let mut out = vec![0u8; usize::try_from(MIB).unwrap_or(1 << 20)];
    out.put(0, METADATA_SIGNATURE);
    out.put_le_u16(10, u16::try_from(items.len()).unwrap_or(0));
    let mut data_off = 64usize << 10;
    for (i, (id, data, flags)) in items.iter().enumerate() {
        let e = 32 + 32 * i;
        out.put(e, &id.0);
        out.put_le_u32(e + 16, u32::try_from(data_off).unwrap_or(0));
        out.put_le_u32(e + 20, u32::try_from(data.len()).unwrap_or(0));
        out.put_le_u32(e + 24, *flags);
        if !out.put(data_off, data) {
            return Err(Error::invalid("metadata items do not fit in 1 MiB"));
        }
        data_off += data.len();
    }
    Ok(out)
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;
    use crate::format::METADATA_GUID;
    use diskimg_blockio::MemStorage;

    #[test]
    fn round_trip_with_parent() {
        let m = Metadata {
            block_size: 1 << 21,
            leave_blocks_allocated: false,
            has_parent: true,
            virtual_size: 1 << 30,
            virtual_size_at: 0,
            logical_sector: 512,
            physical_sector: 4096,
            disk_id: Guid::random(),
            parent: Some(ParentLocator {
                entries: vec![
                    ("parent_linkage".into(), Guid::ZERO.to_braced_string()),
                    ("relative_path".into(), ".\\base.vhdx".into()),
                ],
                linkage_at: None,
            }),
        };
        let bytes = metadata_region_bytes(&m).unwrap();
        let mut img = vec![0u8; 3 << 20];
        img[2 << 20..].copy_from_slice(&bytes);
        let s = MemStorage::from_vec(img);
        let region = Region {
            guid: METADATA_GUID,
            offset: 2 << 20,
            length: 1 << 20,
            required: true,
        };
        let mut back = read_metadata(&s, &region, s.len().unwrap(), &Limits::default()).unwrap();
        assert_eq!(back.virtual_size_at, (2 << 20) + (64 << 10) + 8);
        back.virtual_size_at = 0;
        // The linkage value's place is recorded for relinking: 76 bytes of UTF-16.
        let (at, len) = back.parent.as_mut().unwrap().linkage_at.take().unwrap();
        assert_eq!(len, 76);
        let raw: Vec<u16> = s.to_vec()[at as usize..at as usize + len]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(
            String::from_utf16(&raw).unwrap(),
            Guid::ZERO.to_braced_string()
        );
        assert_eq!(back, m);
        assert_eq!(
            back.parent.unwrap().get("relative_path"),
            Some(".\\base.vhdx")
        );
    }
}
