//! On-disk headers: the hosted sparse header (`KDMV`, VMware "Virtual Disk Format 5.0"
//! §"Hosted Sparse Extent Header"), the ESX sparse header (`COWD`, VMFSSPARSE) and the
//! stream-optimized grain markers and footer (§"Stream-Optimized Compressed Sparse Extents").

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Result};

/// `KDMV` read as a little-endian u32 at offset 0 ("VMDK" backwards).
pub(crate) const SPARSE_MAGIC: &[u8; 4] = b"KDMV";
/// `COWD`: the ESX (VMFSSPARSE) sparse header magic.
pub(crate) const COWD_MAGIC: &[u8; 4] = b"COWD";
/// Sector size every VMDK offset is counted in.
pub(crate) const SECTOR: u64 = 512;

/// Flag bit 0: the newline-detection check bytes are valid.
pub(crate) const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag bit 1: a redundant grain directory and grain tables exist.
pub(crate) const FLAG_RGD: u32 = 1 << 1;
/// Flag bit 2: grain table entry 1 means "zeroed grain" (qemu `VMDK4_FLAG_ZERO_GRAIN`).
pub(crate) const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag bit 16: grains are compressed.
pub(crate) const FLAG_COMPRESS: u32 = 1 << 16;
/// Flag bit 17: the extent contains stream markers.
pub(crate) const FLAG_MARKER: u32 = 1 << 17;
/// Every flag this implementation understands (others are refused).
const KNOWN_FLAGS: u32 = FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESS | FLAG_MARKER;

/// `gdOffset` value meaning "the grain directory is found through the footer".
pub(crate) const GD_AT_END: u64 = u64::MAX;
/// compressAlgorithm: deflate (RFC 1950 zlib streams).
pub(crate) const COMPRESSION_DEFLATE: u16 = 1;

/// Stream marker type: end of stream.
pub(crate) const MARKER_EOS: u32 = 0;
/// Stream marker type: footer follows.
pub(crate) const MARKER_FOOTER: u32 = 3;

/// The hosted sparse extent header (`SparseExtentHeader`), 512 bytes at sector 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SparseHeader {
    /// `version` (1, 2 with zeroed-grain GTEs, 3 with changed-block tracking).
    pub version: u32,
    /// `flags` (bits above).
    pub flags: u32,
    /// `capacity`: extent size in sectors.
    pub capacity: u64,
    /// `grainSize`: grain size in sectors.
    pub granularity: u64,
    /// `descriptorOffset`: embedded descriptor, in sectors (0 = none).
    pub desc_offset: u64,
    /// `descriptorSize`: embedded descriptor size in sectors.
    pub desc_size: u64,
    /// `numGTEsPerGT`: entries per grain table (512 in every VMware image).
    pub num_gtes_per_gt: u32,
    /// `rgdOffset`: redundant grain directory, in sectors.
    pub rgd_offset: u64,
    /// `gdOffset`: grain directory, in sectors (or [`GD_AT_END`]).
    pub gd_offset: u64,
    /// `overHead`: sectors of metadata before the first grain.
    pub grain_offset: u64,
    /// `uncleanShutdown`.
    pub unclean_shutdown: u8,
    /// `compressAlgorithm` (0 none, 1 deflate).
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Parses the 512-byte header sector (magic included). Fails on a wrong magic.
    pub(crate) fn parse(b: &[u8]) -> Result<Self> {
        let bad = || Error::corrupt("vmdk", "sparse header truncated", 0);
        if b.get(0..4) != Some(SPARSE_MAGIC.as_slice()) {
            return Err(Error::not_format("vmdk", "bad sparse extent magic", 0));
        }
        Ok(Self {
            version: b.le_u32(4).ok_or_else(bad)?,
            flags: b.le_u32(8).ok_or_else(bad)?,
            capacity: b.le_u64(12).ok_or_else(bad)?,
            granularity: b.le_u64(20).ok_or_else(bad)?,
            desc_offset: b.le_u64(28).ok_or_else(bad)?,
            desc_size: b.le_u64(36).ok_or_else(bad)?,
            num_gtes_per_gt: b.le_u32(44).ok_or_else(bad)?,
            rgd_offset: b.le_u64(48).ok_or_else(bad)?,
            gd_offset: b.le_u64(56).ok_or_else(bad)?,
            grain_offset: b.le_u64(64).ok_or_else(bad)?,
            unclean_shutdown: b.array_at::<1>(72).ok_or_else(bad)?[0],
            compress_algorithm: b.le_u16(77).ok_or_else(bad)?,
        })
    }

    /// Serialises into a 512-byte sector, with the newline check bytes qemu writes.
    pub(crate) fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b.put(0, SPARSE_MAGIC);
        b.put_le_u32(4, self.version);
        b.put_le_u32(8, self.flags);
        b.put_le_u64(12, self.capacity);
        b.put_le_u64(20, self.granularity);
        b.put_le_u64(28, self.desc_offset);
        b.put_le_u64(36, self.desc_size);
        b.put_le_u32(44, self.num_gtes_per_gt);
        b.put_le_u64(48, self.rgd_offset);
        b.put_le_u64(56, self.gd_offset);
        b.put_le_u64(64, self.grain_offset);
        b.put(72, &[self.unclean_shutdown, b'\n', b' ', b'\r', b'\n']);
        b.put_le_u16(77, self.compress_algorithm);
        b
    }

    /// Refuses versions and flags this implementation does not know (qemu's wording).
    pub(crate) fn validate(&self, writable: bool) -> Result<()> {
        if self.version > 3 {
            return Err(Error::unsupported(
                "vmdk",
                format!("Unsupported VMDK version {}", self.version),
            ));
        }
        if self.version == 3 && writable && self.flags & FLAG_COMPRESS == 0 {
            return Err(Error::invalid("VMDK version 3 must be read only"));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(Error::unsupported(
                "vmdk",
                format!(
                    "unknown sparse header flags {:#x}",
                    self.flags & !KNOWN_FLAGS
                ),
            ));
        }
        if self.flags & FLAG_COMPRESS != 0 && self.compress_algorithm != COMPRESSION_DEFLATE {
            return Err(Error::unsupported(
                "vmdk",
                format!("compression algorithm {}", self.compress_algorithm),
            ));
        }
        Ok(())
    }
}

/// The ESX sparse (`COWD`, VMFSSPARSE) header fields qemu uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CowdHeader {
    /// `numSectors`: extent size in sectors.
    pub disk_sectors: u32,
    /// `grainSize` in sectors.
    pub granularity: u32,
    /// `gdOffset` in sectors.
    pub l1dir_offset: u32,
    /// `numGDEntries`.
    pub l1dir_size: u32,
}

impl CowdHeader {
    /// Parses the `COWD` header (magic included).
    pub(crate) fn parse(b: &[u8]) -> Result<Self> {
        let bad = || Error::corrupt("vmdk", "COWD header truncated", 0);
        if b.get(0..4) != Some(COWD_MAGIC.as_slice()) {
            return Err(Error::not_format("vmdk", "bad COWD magic", 0));
        }
        Ok(Self {
            disk_sectors: b.le_u32(12).ok_or_else(bad)?,
            granularity: b.le_u32(16).ok_or_else(bad)?,
            l1dir_offset: b.le_u32(20).ok_or_else(bad)?,
            l1dir_size: b.le_u32(24).ok_or_else(bad)?,
        })
    }
}

/// Reads the footer of a stream-optimized extent whose header says [`GD_AT_END`]:
/// footer marker, footer header, end-of-stream marker in the last three sectors.
pub(crate) fn parse_footer(b: &[u8], at: u64) -> Result<SparseHeader> {
    let bad = || Error::corrupt("vmdk", "invalid stream-optimized footer", at);
    let fm_size = b.le_u32(8).ok_or_else(bad)?;
    let fm_type = b.le_u32(12).ok_or_else(bad)?;
    let header = SparseHeader::parse(b.get(512..1024).ok_or_else(bad)?).map_err(|_| bad())?;
    let eos_val = b.le_u64(1024).ok_or_else(bad)?;
    let eos_size = b.le_u32(1032).ok_or_else(bad)?;
    let eos_type = b.le_u32(1036).ok_or_else(bad)?;
    if fm_size != 0
        || fm_type != MARKER_FOOTER
        || eos_val != 0
        || eos_size != 0
        || eos_type != MARKER_EOS
    {
        return Err(bad());
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 10_485_760,
            granularity: 128,
            desc_offset: 1,
            desc_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 663,
            grain_offset: 1408,
            unclean_shutdown: 0,
            compress_algorithm: 0,
        };
        let b = h.to_bytes();
        assert_eq!(SparseHeader::parse(&b).unwrap(), h);
        assert!(SparseHeader::parse(&b[..40]).is_err());
        let mut v4 = h.clone();
        v4.version = 4;
        assert!(v4.validate(false).is_err());
        let mut v3 = h;
        v3.version = 3;
        assert!(v3.validate(true).is_err());
        assert!(v3.validate(false).is_ok());
    }
}
