//! Constants of the VHDX on-disk format (MS-VHDX), GUIDs and the CRC-32C checksum rule.

use diskimg_blockio::bytes::WriteBytes;

/// Format name used in errors and info.
pub(crate) const FMT: &str = "vhdx";

/// Largest host offset we accept anywhere (BAT entries, regions, the log), so that
/// adding in-block offsets can never overflow.
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 62;

/// 1 MiB, the alignment unit of VHDX objects (MS-VHDX 2.1).
pub(crate) const MIB: u64 = 1 << 20;
/// 64 KiB, the size of the file identifier, headers and region tables slots (MS-VHDX 2.1).
pub(crate) const KIB64: u64 = 64 << 10;
/// The log's sector size (MS-VHDX 2.3).
pub(crate) const LOG_SECTOR: u64 = 4096;

/// File type identifier signature "vhdxfile" (MS-VHDX 2.2.1).
pub(crate) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Header signature "head" (MS-VHDX 2.2.2).
pub(crate) const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Region table signature "regi" (MS-VHDX 2.2.3).
pub(crate) const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Metadata table signature "metadata" (MS-VHDX 2.6.1).
pub(crate) const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// Log entry header signature "loge" (MS-VHDX 2.3.1.1).
pub(crate) const LOG_ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// Zero descriptor signature "zero" (MS-VHDX 2.3.1.2).
pub(crate) const ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
/// Data descriptor signature "desc" (MS-VHDX 2.3.1.3).
pub(crate) const DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
/// Data sector signature "data" (MS-VHDX 2.3.1.4).
pub(crate) const DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";

/// Offsets of the two headers and two region tables (MS-VHDX 2.1).
pub(crate) const HEADER1_OFFSET: u64 = 64 << 10;
/// Second header.
pub(crate) const HEADER2_OFFSET: u64 = 128 << 10;
/// First region table.
pub(crate) const REGION1_OFFSET: u64 = 192 << 10;
/// Second region table.
pub(crate) const REGION2_OFFSET: u64 = 256 << 10;

/// A GUID as stored on disk (little-endian first three fields, MS-VHDX 1.3 / MS-DTYP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Guid(pub(crate) [u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub(crate) const ZERO: Guid = Guid([0; 16]);

    /// A GUID from its textual fields (`d1-d2-d3-d4`), encoded as on disk.
    pub(crate) const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A fresh random (version 4) GUID.
    pub(crate) fn random() -> Guid {
        use std::hash::{BuildHasher, Hasher};
        let mut out = [0u8; 16];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            h.write_u128(t);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        if let Some(b) = out.get_mut(7) {
            *b = (*b & 0x0f) | 0x40;
        }
        if let Some(b) = out.get_mut(8) {
            *b = (*b & 0x3f) | 0x80;
        }
        Guid(out)
    }

    /// True for the zero GUID.
    pub(crate) fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` as Windows prints it.
    pub(crate) fn to_braced_string(self) -> String {
        let b = self.0;
        let d1 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let d2 = u16::from_le_bytes([b[4], b[5]]);
        let d3 = u16::from_le_bytes([b[6], b[7]]);
        format!(
            "{{{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
        )
    }
}

/// BAT region (MS-VHDX 2.2.3.2): 2DC27766-F623-4200-9D64-115E9BFD4A08.
pub(crate) const BAT_GUID: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Metadata region (MS-VHDX 2.2.3.2): 8B7CA206-4790-4B9A-B8FE-575F050F886E.
pub(crate) const METADATA_GUID: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// File Parameters item (MS-VHDX 2.6.2.1).
pub(crate) const FILE_PARAMETERS_GUID: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Virtual Disk Size item (MS-VHDX 2.6.2.2).
pub(crate) const VIRTUAL_DISK_SIZE_GUID: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Virtual Disk ID item (MS-VHDX 2.6.2.3).
pub(crate) const VIRTUAL_DISK_ID_GUID: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Logical Sector Size item (MS-VHDX 2.6.2.4).
pub(crate) const LOGICAL_SECTOR_GUID: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Physical Sector Size item (MS-VHDX 2.6.2.5).
pub(crate) const PHYSICAL_SECTOR_GUID: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Parent Locator item (MS-VHDX 2.6.2.6).
pub(crate) const PARENT_LOCATOR_GUID: Guid = Guid::from_fields(
    0xA8D3_5F2B,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// Locator type of a VHDX parent (MS-VHDX 2.6.2.6.1).
pub(crate) const PARENT_LOCATOR_TYPE_VHDX: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// CRC-32C of `buf` computed with the 4-byte checksum field at `field` taken as zero
/// (MS-VHDX 2.2.2: "the checksum field is zero during the computation").
pub(crate) fn checksum(buf: &[u8], field: usize) -> u32 {
    let (Some(head), Some(tail)) = (buf.get(..field), buf.get(field.saturating_add(4)..)) else {
        return crc32c::crc32c(buf);
    };
    let c = crc32c::crc32c_append(0, head);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, tail)
}

/// Stores the checksum of `buf` into its field at `field`.
pub(crate) fn set_checksum(buf: &mut [u8], field: usize) {
    let c = checksum(buf, field);
    buf.put_le_u32(field, c);
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;
    use diskimg_blockio::bytes::ReadBytes;

    #[test]
    fn guid_encoding_matches_disk_bytes() {
        // As seen in qemu-created images: 6677c22d23f600429d64115e9bfd4a08.
        assert_eq!(
            BAT_GUID.0,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(
            BAT_GUID.to_braced_string(),
            "{2dc27766-f623-4200-9d64-115e9bfd4a08}"
        );
        assert_ne!(Guid::random(), Guid::random());
    }

    #[test]
    fn checksum_ignores_field() {
        let mut a = vec![7u8; 64];
        set_checksum(&mut a, 4);
        let stored = a.le_u32(4).unwrap_or(0);
        assert_eq!(checksum(&a, 4), stored);
        a[10] ^= 1;
        assert_ne!(checksum(&a, 4), stored);
    }
}
