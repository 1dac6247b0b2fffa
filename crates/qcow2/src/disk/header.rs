//! The qcow2 header (docs/interop/qcow2.txt, "Header"), parsed once at open and validated
//! the way qemu's `qcow2_do_open` does, so code after open can trust it.

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Result};

use crate::disk::ext::Extensions;

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// Size of the version 2 header.
pub(crate) const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header (without compression_type).
pub(crate) const V3_MIN_HEADER_LEN: u32 = 104;
/// What qemu writes for version 3.
pub(crate) const V3_HEADER_LEN: u32 = 112;
/// File offset of `crypt_method` (header bytes 32-35).
pub(crate) const CRYPT_METHOD_AT: u64 = 32;
/// File offset of `incompatible_features` (header bytes 72-79, version 3).
pub(crate) const INCOMPATIBLE_AT: u64 = 72;
/// File offset of `autoclear_features` (header bytes 88-95, version 3).
pub(crate) const AUTOCLEAR_AT: u64 = 88;

/// Incompatible bit 0: refcounts may be stale.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: the image is corrupt.
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data in an external data file.
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: compression_type is non-zero.
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: 128-bit L2 entries with subclusters.
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit we understand.
pub(crate) const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible bit 0: lazy refcounts.
pub(crate) const COMPAT_LAZY: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the data file is a valid raw image.
pub(crate) const AUTOCLEAR_DATA_RAW: u64 = 1 << 1;

/// qemu's `QCOW_MAX_REFTABLE_SIZE` (8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qemu's `QCOW_MAX_L1_SIZE` (32 MiB).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's `QCOW_MAX_SNAPSHOTS`.
const MAX_SNAPSHOTS: u32 = 65536;
/// Host offsets must stay below 2^56 (spec "Host cluster offsets").
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;

/// The parsed header (spec "Header") plus its extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Bytes 4–7: 2 or 3.
    pub version: u32,
    /// Bytes 8–15: where the backing file name is (0 = none).
    pub backing_file_offset: u64,
    /// Bytes 16–19: backing file name length.
    pub backing_file_size: u32,
    /// Bytes 20–23: log2 of the cluster size (9–21).
    pub cluster_bits: u32,
    /// Bytes 24–31: virtual size.
    pub size: u64,
    /// Bytes 32–35: 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Bytes 36–39: entries in the active L1 table.
    pub l1_size: u32,
    /// Bytes 40–47: offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Bytes 48–55: offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Bytes 56–59: clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Bytes 60–63: number of internal snapshots.
    pub nb_snapshots: u32,
    /// Bytes 64–71: offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Bytes 72–79 (v3): incompatible feature bits.
    pub incompatible: u64,
    /// Bytes 80–87 (v3): compatible feature bits.
    pub compatible: u64,
    /// Bytes 88–95 (v3): autoclear feature bits.
    pub autoclear: u64,
    /// Bytes 96–99 (v3): refcount width is `1 << refcount_order` bits (v2: 4).
    pub refcount_order: u32,
    /// Bytes 100–103 (v3): header length (v2: 72).
    pub header_length: u32,
    /// Byte 104 (v3, header_length > 104): 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// The backing file name (spec "Header": not NUL-terminated).
    pub backing_file: Option<String>,
    /// Header extensions.
    pub ext: Extensions,
}

fn bad(what: &'static str, off: u64) -> Error {
    Error::corrupt("qcow2", what, off)
}

fn check_table(offset: u64, bytes: u64, cluster_size: u64, what: &'static str) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(bad(what, offset));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= MAX_HOST_OFFSET => Ok(()),
        _ => Err(bad(what, offset)),
    }
}

impl Header {
    /// Cluster size in bytes.
    pub(crate) fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    /// True with extended L2 entries.
    pub(crate) fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    /// True with an external data file.
    pub(crate) fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub(crate) fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }
    /// Entries per L2 table.
    pub(crate) fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }
    /// Guest bytes one L1 entry covers.
    pub(crate) fn l1_coverage(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }
    /// L1 entries needed for `size` guest bytes.
    pub(crate) fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l1_coverage())
    }
    /// Refcount width in bits.
    pub(crate) fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses and validates the header in `buf` (the first cluster, or as much of it as
    /// the file holds). `file_len` bounds nothing here; tables are checked when read.
    pub(crate) fn parse(buf: &[u8]) -> Result<Self> {
        let f32 = |o: usize| buf.be_u32(o).ok_or(bad("header truncated", 0));
        let f64 = |o: usize| buf.be_u64(o).ok_or(bad("header truncated", 0));
        if f32(0)? != MAGIC {
            return Err(crate::errors::not_qcow2());
        }
        let version = f32(4)?;
        if version != 2 && version != 3 {
            return Err(Error::unsupported(
                "qcow2",
                format!("Unsupported qcow2 version {version}"),
            ));
        }
        let cluster_bits = f32(20)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::unsupported(
                "qcow2",
                format!("Unsupported cluster size: 2^{cluster_bits}"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: f64(8)?,
            backing_file_size: f32(16)?,
            cluster_bits,
            size: f64(24)?,
            crypt_method: f32(32)?,
            l1_size: f32(36)?,
            l1_table_offset: f64(40)?,
            refcount_table_offset: f64(48)?,
            refcount_table_clusters: f32(56)?,
            nb_snapshots: f32(60)?,
            snapshots_offset: f64(64)?,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            ext: Extensions::default(),
        };
        if version == 3 {
            h.incompatible = f64(72)?;
            h.compatible = f64(80)?;
            h.autoclear = f64(88)?;
            h.refcount_order = f32(96)?;
            h.header_length = f32(100)?;
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(bad("qcow2 header too short", 100));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(bad("qcow2 header exceeds cluster size", 100));
            }
            if h.header_length > V3_MIN_HEADER_LEN {
                h.compression_type = *buf.get(104).ok_or(bad("header truncated", 104))?;
            }
        }
        if h.backing_file_offset > cluster_size {
            return Err(bad("Invalid backing file offset", 8));
        }
        let end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cluster_size
        };
        h.ext = Extensions::parse(buf, u64::from(h.header_length), end)?;
        h.validate_features()?;
        if h.refcount_order > 6 {
            return Err(bad(
                "Reference count entry width too large; may not exceed 64 bits",
                96,
            ));
        }
        if h.crypt_method > 2 {
            return Err(Error::unsupported(
                "qcow2",
                format!("Unsupported encryption method: {}", h.crypt_method),
            ));
        }
        h.validate_tables()?;
        if h.backing_file_offset != 0 {
            let len = u64::from(h.backing_file_size);
            if len > 1023 || len > cluster_size - h.backing_file_offset {
                return Err(bad("Backing file name too long", 16));
            }
            let start = usize::try_from(h.backing_file_offset)
                .map_err(|_| bad("Invalid backing file offset", 8))?;
            let n = usize::try_from(len).map_err(|_| bad("Backing file name too long", 16))?;
            let name = start
                .checked_add(n)
                .and_then(|e| buf.get(start..e))
                .ok_or(bad("header truncated", h.backing_file_offset))?;
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        Ok(h)
    }

    fn validate_features(&self) -> Result<()> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            // qemu's report_unsupported_feature: the table's names in table order,
            // then the bits it does not name as one mask.
            let mut names = Vec::new();
            let mut rest = unknown;
            for (t, b, n) in &self.ext.features {
                let bit = 1u64.checked_shl(u32::from(*b)).unwrap_or(0);
                if *t == 0 && rest & bit != 0 {
                    names.push(n.chars().take(46).collect::<String>());
                    rest &= !bit;
                }
            }
            if rest != 0 {
                names.push(format!("Unknown incompatible feature: {rest:x}"));
            }
            return Err(Error::unsupported(
                "qcow2",
                format!("Unsupported qcow2 feature(s): {}", names.join(", ")),
            ));
        }
        match (
            self.compression_type,
            self.incompatible & INCOMPAT_COMPRESSION != 0,
        ) {
            (0, true) => {
                return Err(bad(
                    "Compression type incompatible feature bit must not be set",
                    72,
                ));
            }
            (1, false) => {
                return Err(bad(
                    "Compression type incompatible feature bit must be set",
                    72,
                ));
            }
            (0 | 1, _) => {}
            _ => return Err(bad("Unknown compression type", 104)),
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(bad(
                "extended L2 entries need clusters of at least 16 KiB",
                20,
            ));
        }
        Ok(())
    }

    /// The snapshot table's count and offset, as qemu checks them at open (not when
    /// opening for `check`, which reads the table itself): `what` names the table
    /// ("Snapshot table" at open, "snapshot table" in the check).
    pub(crate) fn validate_snapshot_table(&self, what: &str) -> Result<()> {
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt("qcow2", format!("{what} too large"), 60));
        }
        // As qemu, an unaligned offset is invalid even when there are no snapshots.
        let cs = self.cluster_size();
        let end = self
            .snapshots_offset
            .checked_add(u64::from(self.nb_snapshots) * 40);
        if !self.snapshots_offset.is_multiple_of(cs) || end.is_none_or(|e| e > MAX_HOST_OFFSET) {
            let what = format!("{what} offset invalid");
            return Err(Error::corrupt("qcow2", what, self.snapshots_offset));
        }
        Ok(())
    }

    fn validate_tables(&self) -> Result<()> {
        let cs = self.cluster_size();
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad("Reference count table too large", 56));
        }
        if self.refcount_table_clusters == 0 {
            return Err(bad("Image does not contain a reference count table", 56));
        }
        check_table(
            self.refcount_table_offset,
            rt_bytes,
            cs,
            "Reference count table offset invalid",
        )?;
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad("Active L1 table too large", 36));
        }
        let needed = self.l1_entries_for(self.size);
        if needed > 0x7fff_ffff {
            return Err(bad("Image is too big", 24));
        }
        if u64::from(self.l1_size) < needed {
            return Err(bad("L1 table is too small", 36));
        }
        if self.l1_size > 0 {
            check_table(
                self.l1_table_offset,
                l1_bytes,
                cs,
                "Active L1 table offset invalid",
            )?;
        }
        Ok(())
    }

    /// Serialises the fixed header fields (not the extensions) into `buf`.
    pub(crate) fn write_fixed(&self, buf: &mut [u8]) -> bool {
        let mut ok = buf.put_be_u32(0, MAGIC)
            && buf.put_be_u32(4, self.version)
            && buf.put_be_u64(8, self.backing_file_offset)
            && buf.put_be_u32(16, self.backing_file_size)
            && buf.put_be_u32(20, self.cluster_bits)
            && buf.put_be_u64(24, self.size)
            && buf.put_be_u32(32, self.crypt_method)
            && buf.put_be_u32(36, self.l1_size)
            && buf.put_be_u64(40, self.l1_table_offset)
            && buf.put_be_u64(48, self.refcount_table_offset)
            && buf.put_be_u32(56, self.refcount_table_clusters)
            && buf.put_be_u32(60, self.nb_snapshots)
            && buf.put_be_u64(64, self.snapshots_offset);
        if self.version >= 3 {
            ok = ok
                && buf.put_be_u64(72, self.incompatible)
                && buf.put_be_u64(80, self.compatible)
                && buf.put_be_u64(88, self.autoclear)
                && buf.put_be_u32(96, self.refcount_order)
                && buf.put_be_u32(100, self.header_length)
                && buf.put(104, &[self.compression_type]);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> Vec<u8> {
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            ext: Extensions::default(),
        };
        let mut buf = vec![0u8; 4096];
        assert!(h.write_fixed(&mut buf));
        buf
    }

    #[test]
    fn parses_and_refuses() {
        let buf = v3();
        let h = Header::parse(&buf).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        let mut b = buf.clone();
        b[79] = 0x20; // unknown incompatible bit 5
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("Unknown incompatible feature: 20"), "{e}");
        let mut b = buf.clone();
        b[23] = 8;
        assert!(Header::parse(&b).is_err());
        let mut b = buf.clone();
        // nb_snapshots 65537
        b[61] = 1;
        b[63] = 1;
        let e = Header::parse(&b)
            .unwrap()
            .validate_snapshot_table("Snapshot table");
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("Snapshot table too large")
        );
        let mut b = buf.clone();
        b[55] = 1; // refcount table offset 0x10001
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("Reference count table offset invalid"), "{e}");
        assert!(Header::parse(&b).is_err());
        let mut b = buf;
        b[39] = 0;
        assert!(
            Header::parse(&b)
                .unwrap_err()
                .to_string()
                .contains("too small")
        );
    }

    /// `buf` with incompatible bits `bits` and a feature-name table extension `table`.
    fn with_features(bits: u64, table: &[u8]) -> Vec<u8> {
        let mut b = v3();
        b[72..80].copy_from_slice(&bits.to_be_bytes());
        let at = V3_HEADER_LEN as usize;
        b[at..at + 4].copy_from_slice(&0x6803_f857u32.to_be_bytes());
        b[at + 4..at + 8].copy_from_slice(&u32::try_from(table.len()).unwrap().to_be_bytes());
        b[at + 8..at + 8 + table.len()].copy_from_slice(table);
        b
    }

    fn entry(ty: u8, bit: u8, name: &str) -> Vec<u8> {
        let mut e = vec![ty, bit];
        e.extend_from_slice(name.as_bytes());
        e.resize(48, 0);
        e
    }

    /// The names qemu prints for unknown incompatible bits (iotest 036): the table's
    /// names in table order (a short last entry counts), then the rest as one mask.
    #[test]
    fn unknown_features_named_as_qemu() {
        let msg = |bits: u64, table: &[u8]| {
            let e = Header::parse(&with_features(bits, table))
                .unwrap_err()
                .to_string();
            e.split("feature(s): ").nth(1).unwrap_or(&e).to_string()
        };
        let b = |n: u32| 1u64 << n;
        // A 14-byte table: one entry shorter than 48 bytes.
        let short = b"\x00\x3fTest feature";
        assert_eq!(msg(b(63), short), "Test feature");
        assert_eq!(
            msg(b(61) | b(62) | b(63), &[]),
            "Unknown incompatible feature: e000000000000000"
        );
        assert_eq!(
            msg(b(61) | b(62) | b(63), short),
            "Test feature, Unknown incompatible feature: 6000000000000000"
        );
        let two = [entry(0, 61, "test1"), entry(0, 62, "test2")].concat();
        assert_eq!(
            msg(b(61) | b(63), &two),
            "test1, Unknown incompatible feature: 8000000000000000"
        );
        // Entries of other types, and entries after a nameless one, do not count.
        let mixed = [
            entry(1, 61, "c"),
            entry(0, 62, "test2"),
            entry(0, 0, ""),
            entry(0, 63, "x"),
        ]
        .concat();
        assert_eq!(
            msg(b(61) | b(62) | b(63), &mixed),
            "test2, Unknown incompatible feature: a000000000000000"
        );
    }
}
