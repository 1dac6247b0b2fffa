//! The 512-byte hard disk footer (VHD spec, "Hard Disk Footer Format"), its checksum,
//! the CHS geometry rules and the virtual-size rule qemu applies.

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Result};

/// qemu's name for the format.
pub const FORMAT: &str = "vpc";

/// Size of the footer (and of its copy at offset 0 in dynamic/differencing disks).
pub const FOOTER_SIZE: usize = 512;
/// [`FOOTER_SIZE`] as a file length (for the allocation arithmetic in `check`).
pub(crate) const FOOTER_BYTES: u64 = FOOTER_SIZE as u64;
/// The footer cookie ("Cookie" field).
pub const COOKIE: &[u8; 8] = b"conectix";
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;
/// Largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors per track.
pub const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// qemu's limit on the virtual size: 2040 GiB in sectors.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// "Data Offset" of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;

/// "Disk Type" field values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the data precedes the footer, byte for byte.
    Fixed,
    /// 3: blocks allocated on demand through the BAT.
    Dynamic,
    /// 4: a dynamic disk whose clear sector-bitmap bits defer to a parent.
    Differencing,
}

impl DiskType {
    /// The on-disk value.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
}

/// CHS geometry as stored in the footer ("Disk Geometry").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cyls: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub secs: u8,
}

impl Geometry {
    /// The maximum geometry (65535/16/255), which qemu also writes for `force_size`.
    pub const MAX: Geometry = Geometry {
        cyls: 65535,
        heads: 16,
        secs: 255,
    };

    /// Total sectors the geometry addresses.
    pub fn sectors(self) -> u64 {
        u64::from(self.cyls) * u64::from(self.heads) * u64::from(self.secs)
    }

    /// The geometry the VHD spec's appendix algorithm gives for `total_sectors`
    /// (rounding down), as qemu computes it.
    pub fn for_sectors(total_sectors: u64) -> Geometry {
        let total = total_sectors.min(MAX_GEOMETRY);
        let (secs, heads, cth): (u64, u64, u64);
        if total >= 65535 * 16 * 63 {
            secs = 255;
            heads = 16;
            cth = total / secs;
        } else {
            let mut s = 17;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            secs = s;
            heads = h;
            cth = c;
        }
        Geometry {
            cyls: u16::try_from(cth / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(u8::MAX),
            secs: u8::try_from(secs).unwrap_or(u8::MAX),
        }
    }
}

/// The smallest geometry covering `size` bytes and the size it gives, as qemu-img's
/// create rounds it: `(geometry, total_sectors)`. `force_size` keeps the exact size
/// (in sectors) with the maximum geometry.
pub fn rounded_size(size: u64, force_size: bool) -> Result<(Geometry, u64)> {
    let geo = if force_size {
        Geometry::MAX
    } else {
        let want = MAX_GEOMETRY.min(size / 512);
        let mut geo = Geometry {
            cyls: 0,
            heads: 0,
            secs: 0,
        };
        let mut i = 0;
        while want > geo.sectors() {
            geo = Geometry::for_sectors(want + i);
            i += 1;
        }
        geo
    };
    let sectors = if geo.sectors() == MAX_GEOMETRY {
        let s = size / 512;
        if s > MAX_SECTORS {
            return Err(Error::invalid(
                "Disk size is too large, max size is 2040 GiB",
            ));
        }
        s
    } else {
        geo.sectors()
    };
    Ok((geo, sectors))
}

/// The one's complement of the byte sum, skipping the 4-byte checksum at `skip`.
pub fn checksum(buf: &[u8], skip: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// The parsed footer. The raw bytes are kept so rewrites preserve every field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// The 512 bytes as read (or built), checksum included.
    pub raw: [u8; FOOTER_SIZE],
    /// "Data Offset" (offset 16): the dynamic header's host offset.
    pub data_offset: u64,
    /// "Time Stamp" (offset 24): seconds since 2000-01-01.
    pub timestamp: u32,
    /// "Creator Application" (offset 28).
    pub creator_app: [u8; 4],
    /// "Current Size" (offset 48) in bytes.
    pub current_size: u64,
    /// "Disk Geometry" (offset 56).
    pub geometry: Geometry,
    /// "Disk Type" (offset 60).
    pub disk_type: DiskType,
    /// "Unique Id" (offset 68).
    pub uuid: [u8; 16],
}

/// Offset of the checksum field in the footer.
const CHECKSUM_AT: usize = 64;

impl Footer {
    /// True when `buf` starts with the cookie and its checksum is valid.
    pub fn looks_valid(buf: &[u8]) -> bool {
        buf.get(..8) == Some(COOKIE.as_slice())
            && buf.len() >= FOOTER_SIZE
            && buf.be_u32(CHECKSUM_AT) == buf.get(..FOOTER_SIZE).map(|f| checksum(f, CHECKSUM_AT))
    }

    /// Parses a footer read at host offset `at` (for error messages).
    pub fn parse(buf: &[u8], at: u64) -> Result<Footer> {
        let bad = |what| Error::corrupt(FORMAT, what, at);
        let raw: [u8; FOOTER_SIZE] = buf.array_at(0).ok_or(bad("footer truncated"))?;
        if raw.get(..8) != Some(COOKIE.as_slice()) {
            return Err(Error::not_format(FORMAT, "invalid VPC image", at));
        }
        if raw.be_u32(CHECKSUM_AT) != Some(checksum(&raw, CHECKSUM_AT)) {
            return Err(Error::corrupt(
                FORMAT,
                "Incorrect header checksum",
                at + CHECKSUM_AT as u64,
            ));
        }
        let disk_type = match raw.be_u32(60) {
            Some(2) => DiskType::Fixed,
            Some(3) => DiskType::Dynamic,
            Some(4) => DiskType::Differencing,
            _ => {
                return Err(Error::unsupported(
                    FORMAT,
                    "unknown disk type in the footer",
                ));
            }
        };
        Ok(Footer {
            data_offset: raw.be_u64(16).ok_or(bad("footer truncated"))?,
            timestamp: raw.be_u32(24).ok_or(bad("footer truncated"))?,
            creator_app: raw.array_at(28).ok_or(bad("footer truncated"))?,
            current_size: raw.be_u64(48).ok_or(bad("footer truncated"))?,
            geometry: Geometry {
                cyls: raw.be_u16(56).ok_or(bad("footer truncated"))?,
                heads: raw.array_at::<1>(58).map(|[h]| h).unwrap_or(0),
                secs: raw.array_at::<1>(59).map(|[s]| s).unwrap_or(0),
            },
            disk_type,
            uuid: raw.array_at(68).ok_or(bad("footer truncated"))?,
            raw,
        })
    }

    /// Builds a new footer as qemu-img writes it.
    pub fn build(
        disk_type: DiskType,
        size: u64,
        geometry: Geometry,
        creator_app: [u8; 4],
        timestamp: u32,
        uuid: [u8; 16],
    ) -> Footer {
        let mut raw = [0u8; FOOTER_SIZE];
        let data_offset = match disk_type {
            DiskType::Fixed => NO_DATA_OFFSET,
            _ => 512,
        };
        raw.put(0, COOKIE);
        raw.put_be_u32(8, 2); // features: reserved bit always set
        raw.put_be_u32(12, 0x0001_0000); // file format version
        raw.put_be_u64(16, data_offset);
        raw.put_be_u32(24, timestamp);
        raw.put(28, &creator_app);
        raw.put_be_u32(32, 0x0005_0003); // creator version, as qemu
        raw.put(36, b"Wi2k"); // creator host OS, as qemu
        raw.put_be_u64(40, size); // original size
        raw.put_be_u64(48, size); // current size
        raw.put_be_u16(56, geometry.cyls);
        raw.put(58, &[geometry.heads, geometry.secs]);
        raw.put_be_u32(60, disk_type.code());
        raw.put(68, &uuid);
        let sum = checksum(&raw, CHECKSUM_AT);
        raw.put_be_u32(CHECKSUM_AT, sum);
        Footer {
            raw,
            data_offset,
            timestamp,
            creator_app,
            current_size: size,
            geometry,
            disk_type,
            uuid,
        }
    }

    /// The virtual size in bytes qemu derives: CHS geometry unless the creator is one
    /// that uses current_size, the geometry is at its maximum, or `force` overrides.
    pub fn virtual_size(&self, force: Option<SizeCalc>) -> u64 {
        const SIZE_CREATORS: [&[u8; 4]; 6] =
            [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0", b"wa\0\0"];
        let chs = self.geometry.sectors();
        let use_chs = !SIZE_CREATORS.contains(&&self.creator_app) || force == Some(SizeCalc::Chs);
        let sectors = if !use_chs || chs == MAX_GEOMETRY || force == Some(SizeCalc::CurrentSize) {
            self.current_size / 512
        } else {
            chs
        };
        sectors * 512
    }
}

/// qemu's runtime option `force_size_calc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeCalc {
    /// `chs`: use the geometry even for current_size creators.
    Chs,
    /// `current_size`: use the footer's current size.
    CurrentSize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_rounding() {
        // Values observed from qemu-img 10.0.2 (`create -f vpc 64M` ⇒ 964/8/17).
        let (g, s) = rounded_size(64 << 20, false).unwrap();
        assert_eq!((g.cyls, g.heads, g.secs), (964, 8, 17));
        assert_eq!(s * 512, 67_125_248);
        let (g, s) = rounded_size(10_000_384, true).unwrap();
        assert_eq!(g, Geometry::MAX);
        assert_eq!(s * 512, 10_000_384);
        assert!(rounded_size(3 << 40, false).is_err());
        assert_eq!(rounded_size(0, false).unwrap().1, 0);
    }

    #[test]
    fn footer_roundtrip() {
        let f = Footer::build(
            DiskType::Dynamic,
            1 << 20,
            Geometry::MAX,
            *b"qem2",
            5,
            [7; 16],
        );
        let p = Footer::parse(&f.raw, 0).unwrap();
        assert_eq!(p, f);
        assert!(Footer::looks_valid(&f.raw));
        assert_eq!(p.virtual_size(None), 1 << 20);
        let mut bad = f.raw;
        bad[100] ^= 1;
        assert!(Footer::parse(&bad, 0).is_err());
    }
}
