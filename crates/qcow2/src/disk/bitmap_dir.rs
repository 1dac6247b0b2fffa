//! The bitmap directory (spec "Bitmap directory"), read and checked as qemu's
//! `bitmap_list_load` and `check_dir_entry` (block/qcow2-bitmap.c) do at every open:
//! an entry breaking a constraint (reserved flags, type, granularity, table size, extra
//! data) makes the whole image unopenable, in qemu's words.

use diskimg_blockio::{Error, Limits, Result, Storage};

use super::ext::BitmapsExt;
use diskimg_blockio::bytes::ReadBytes;

/// Most bitmaps in one image (`QCOW2_MAX_BITMAPS`).
const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory qemu reads (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Directory entry flags no version of the spec defines (`BME_RESERVED_FLAGS`).
pub(crate) const RESERVED_FLAGS: u32 = 0xffff_fffc;
/// Most bitmap table entries (`BME_MAX_TABLE_SIZE`).
const MAX_TABLE_SIZE: u32 = 0x0800_0000;
/// Most bytes of bitmap data one bitmap may take (`BME_MAX_PHYS_SIZE`).
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Longest bitmap name (`BME_MAX_NAME_SIZE`).
const MAX_NAME_SIZE: u16 = 1023;
/// The one bitmap type (`BT_DIRTY_TRACKING_BITMAP`).
const TYPE_DIRTY_TRACKING: u8 = 1;
/// How far past the end of the file a directory may reach: the tail of its last entry
/// (header, longest name, padding), which reads as zeroes as qemu's `bdrv_pread` past
/// the end does. Any entry lying wholly beyond the file is all zeroes, which
/// `check_dir_entry` refuses (table size 0), so nothing more is ever needed.
const PAST_EOF_SLACK: u64 = 24 + MAX_NAME_SIZE as u64 + 7;

/// One bitmap directory entry (spec "Bitmap directory"), checked by
/// [`parse_bitmap_directory`]: its type is 1 and it has no extra data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BitmapEntry {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit (`1 << granularity_bits`).
    pub granularity: u64,
    /// `granularity_bits` (9..=31).
    pub gbits: u8,
    /// Flags (bit 0 `in_use`, bit 1 `auto`; no reserved bit).
    pub flags: u32,
    /// Flag bit 0.
    pub in_use: bool,
    /// Flag bit 1.
    pub auto: bool,
    /// Bitmap table offset.
    pub table_offset: u64,
    /// Bitmap table entries.
    pub table_size: u32,
}

/// The bitmap table entries (clusters of bits) a bitmap of `2^gbits`-byte granules needs
/// for a disk of `disk_len` bytes with `cs`-byte clusters: qemu's `load_bitmap_data`
/// wants exactly this many (`size_to_clusters` of the serialisation size, 64-bit words
/// of bits, which for clusters of 512 bytes or more is the same count).
pub(crate) fn table_entries_needed(disk_len: u64, gbits: u8, cs: u64) -> u64 {
    disk_len
        .div_ceil(1u64 << gbits.min(63))
        .div_ceil(64)
        .saturating_mul(8)
        .div_ceil(cs.max(1))
}

fn bad(what: impl Into<std::borrow::Cow<'static, str>>, off: u64) -> Error {
    Error::corrupt("qcow2", what, off)
}

/// qemu's checks of the bitmaps extension itself (`qcow2_read_extensions`), made when
/// its autoclear bit is set.
pub(crate) fn check_ext(b: &BitmapsExt, cs: u64) -> Result<()> {
    let off = b.directory_offset;
    if b.nb_bitmaps > MAX_BITMAPS {
        return Err(bad(
            format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of \
                 {MAX_BITMAPS}",
                b.nb_bitmaps
            ),
            off,
        ));
    }
    if b.nb_bitmaps == 0 {
        return Err(bad("found bitmaps extension with zero bitmaps", off));
    }
    if !off.is_multiple_of(cs) {
        return Err(bad("bitmaps_ext: invalid bitmap directory offset", off));
    }
    if b.directory_size > MAX_DIRECTORY_SIZE {
        return Err(bad(
            format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size \
                 ({MAX_DIRECTORY_SIZE})",
                b.directory_size
            ),
            off,
        ));
    }
    Ok(())
}

/// The directory's bytes. Memory stays proportional to the file: a directory reaching
/// more than [`PAST_EOF_SLACK`] bytes past its end is refused before anything is
/// allocated (qemu would read zeroes there and then refuse an all-zero entry).
pub(crate) fn read_directory_bytes(
    file: &dyn Storage,
    limits: &Limits,
    b: &BitmapsExt,
) -> Result<Vec<u8>> {
    let off = b.directory_offset;
    if b.directory_size == 0 {
        return Err(bad("Requested bitmap directory size is zero", off));
    }
    if b.directory_size > MAX_DIRECTORY_SIZE {
        return Err(bad("Requested bitmap directory size is too big", off));
    }
    let reach = file.len()?.saturating_add(PAST_EOF_SLACK);
    if off.checked_add(b.directory_size).is_none_or(|e| e > reach) {
        return Err(bad("bitmap directory beyond the end of the file", off));
    }
    let mut buf = limits.alloc("bitmap directory", b.directory_size)?;
    crate::engine::meta::read_host(file, &mut buf, off)?;
    Ok(buf)
}

/// Parses and checks the directory of `nb` entries in `buf` (read from host offset
/// `at`) for an image of cluster size `cs` and guest size `disk_len`, as qemu's
/// `bitmap_list_load`: the entries must fill `buf` exactly, and each must pass
/// `check_dir_entry`.
pub(crate) fn parse_bitmap_directory(
    buf: &[u8],
    at: u64,
    nb: u32,
    cs: u64,
    disk_len: u64,
) -> Result<Vec<BitmapEntry>> {
    let broken = || bad("Broken bitmap directory", at);
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < buf.len() {
        let hd = buf.get(off..off + 24).ok_or_else(broken)?;
        if out.len() as u64 >= u64::from(nb) {
            return Err(bad(
                "More bitmaps found than specified in header extension",
                at + off as u64,
            ));
        }
        let (table_offset, table_size, flags) = (
            hd.be_u64(0).unwrap_or(0),
            hd.be_u32(8).unwrap_or(0),
            hd.be_u32(12).unwrap_or(0),
        );
        let (ty, gbits) = (hd.get(16).copied(), hd.get(17).copied().unwrap_or(0));
        let name_size = hd.be_u16(18).unwrap_or(0);
        let extra = u64::from(hd.be_u32(20).unwrap_or(0));
        let size = (24 + u64::from(name_size) + extra).next_multiple_of(8);
        let next = (off as u64)
            .checked_add(size)
            .filter(|&n| n <= buf.len() as u64)
            .ok_or_else(broken)?;
        if extra != 0 {
            return Err(bad("Bitmap extra data is not supported", at + off as u64));
        }
        let name = buf
            .get(off + 24..off + 24 + usize::from(name_size))
            .ok_or_else(broken)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let ok = table_size != 0
            && table_offset != 0
            && table_offset.is_multiple_of(cs)
            && table_size <= MAX_TABLE_SIZE
            && (9..=31).contains(&gbits)
            && flags & RESERVED_FLAGS == 0
            && name_size <= MAX_NAME_SIZE
            && ty == Some(TYPE_DIRTY_TRACKING)
            && fits(u64::from(table_size) * cs, flags & 1 != 0, gbits, disk_len);
        if !ok {
            return Err(bad(
                format!("Bitmap '{name}' doesn't satisfy the constraints"),
                at + off as u64,
            ));
        }
        out.push(BitmapEntry {
            name,
            granularity: 1u64 << gbits,
            gbits,
            flags,
            in_use: flags & 1 != 0,
            auto: flags & 2 != 0,
            table_offset,
            table_size,
        });
        off = usize::try_from(next).map_err(|_| broken())?;
    }
    if out.len() as u64 != u64::from(nb) {
        return Err(bad(
            "Less bitmaps found than specified in header extension",
            at,
        ));
    }
    Ok(out)
}

/// `check_dir_entry`'s size rules: at most [`MAX_PHYS_SIZE`] bytes of bitmap data, and
/// (unless the bitmap is in use, whose data is not read) enough of them for the disk.
fn fits(phys: u64, in_use: bool, gbits: u8, disk_len: u64) -> bool {
    if phys > MAX_PHYS_SIZE {
        return false;
    }
    // phys <= 2^29 and gbits <= 31: (phys * 8) << gbits < 2^63.
    in_use || disk_len <= (phys * 8) << gbits
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::unwrap_used
)]
mod tests {
    use super::*;

    fn entry(flags: u32, ty: u8, gbits: u8, extra: u32, name: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 24];
        e[..8].copy_from_slice(&0x5_0000u64.to_be_bytes());
        e[8..12].copy_from_slice(&1u32.to_be_bytes());
        e[12..16].copy_from_slice(&flags.to_be_bytes());
        e[16] = ty;
        e[17] = gbits;
        e[18..20].copy_from_slice(&(name.len() as u16).to_be_bytes());
        e[20..24].copy_from_slice(&extra.to_be_bytes());
        e.extend(std::iter::repeat_n(0, extra as usize));
        e.extend_from_slice(name);
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    fn err(buf: &[u8], nb: u32) -> String {
        parse_bitmap_directory(buf, 0, nb, 65536, 64 << 20)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn qemu_constraints() {
        let good = entry(2, 1, 16, 0, b"b0");
        let e = parse_bitmap_directory(&good, 0, 1, 65536, 64 << 20).unwrap();
        assert_eq!(
            (e[0].name.as_str(), e[0].auto, e[0].in_use),
            ("b0", true, false)
        );
        let refused = "Bitmap 'b0' doesn't satisfy the constraints";
        assert_eq!(err(&entry(4, 1, 16, 0, b"b0"), 1), refused);
        assert_eq!(err(&entry(1 << 31, 1, 16, 0, b"b0"), 1), refused);
        assert_eq!(err(&entry(2, 2, 16, 0, b"b0"), 1), refused);
        assert_eq!(err(&entry(2, 1, 8, 0, b"b0"), 1), refused);
        // One cluster of bits at 512-byte granules covers 256 MiB: not 64 GiB.
        let fine = entry(0, 1, 9, 0, b"b0");
        assert!(parse_bitmap_directory(&fine, 0, 1, 65536, 256 << 20).is_ok());
        let e = parse_bitmap_directory(&fine, 0, 1, 65536, 64 << 30);
        assert_eq!(e.unwrap_err().to_string(), refused);
        // ...unless it is in use (its data is never read).
        let in_use = entry(1, 1, 9, 0, b"b0");
        assert!(parse_bitmap_directory(&in_use, 0, 1, 65536, 64 << 30).is_ok());
        assert_eq!(
            err(&entry(2, 1, 16, 8, b"b0"), 1),
            "Bitmap extra data is not supported"
        );
        let two = [good.clone(), good.clone()].concat();
        assert_eq!(
            err(&two, 1),
            "More bitmaps found than specified in header extension"
        );
        assert_eq!(
            err(&good, 2),
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(err(&good[..20], 1), "Broken bitmap directory");
        assert_eq!(
            err(&[good.clone(), vec![0; 8]].concat(), 2),
            "Broken bitmap directory"
        );
    }
}
