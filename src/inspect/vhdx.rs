//! VHDX (MS-VHDX): headers, region table, metadata table and items, the parent locator
//! of a differencing image (every path entry a reference, the linkage checked), unknown
//! required regions and items, the BAT against the file, a pending log.

use diskimg_blockio::bytes::ReadBytes;

use super::read::{Image, Ranges, utf16};
use super::{ReferenceKind, Report};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// A GUID written as in MS-VHDX (`2DC27766-F623-4200-9D64-115E9BFD4A08`), as stored:
/// the first three fields little-endian, the last eight bytes in order. Evaluated at
/// compile time only, where a short text fails the build.
#[allow(clippy::indexing_slicing)]
const fn guid(text: &str) -> [u8; 16] {
    let t = text.as_bytes();
    // Byte `i` of the stored GUID is the hex pair at this position of the text.
    const AT: [usize; 16] = [6, 4, 2, 0, 11, 9, 16, 14, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = hex_digit(t[AT[i]]) << 4 | hex_digit(t[AT[i] + 1]);
        i += 1;
    }
    out
}

/// The value of a hex digit (0 for anything else; the test below pins the texts).
const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'A'..=b'F' => c - b'A' + 10,
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    }
}

const BAT: [u8; 16] = guid("2DC27766-F623-4200-9D64-115E9BFD4A08");
const METADATA: [u8; 16] = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
const FILE_PARAMS: [u8; 16] = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
const DISK_SIZE: [u8; 16] = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
const DISK_ID: [u8; 16] = guid("BECA12AB-B2E6-4523-93EF-C309E000C746");
const LOGICAL: [u8; 16] = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
const PHYSICAL: [u8; 16] = guid("CDA348C7-445D-4471-9CC9-E9885251C556");
const PARENT: [u8; 16] = guid("A8D35F2B-B30B-454D-ABF7-D3D84834AB0C");

fn structure(r: &mut Report, msg: impl Into<String>) {
    r.unsafe_("structure", msg);
}

/// CRC-32C of `b` with the checksum field at `field` taken as zero equals that field.
fn crc_ok(b: &[u8], field: usize) -> bool {
    let mut c = b.to_vec();
    if let Some(f) = c.get_mut(field..field + 4) {
        f.fill(0);
    }
    b.le_u32(field) == Some(crc32c::crc32c(&c))
}

/// What the metadata says.
#[derive(Default)]
struct Meta {
    block: u64,
    size: u64,
    logical: u64,
    has_parent: bool,
}

/// Inspects a VHDX.
pub(crate) fn inspect(img: &Image<'_>, r: &mut Report) {
    let mut meta = Ranges::default();
    meta.add(0, 1024 * KIB, "header area");
    let Some(header) = current_header(img, r) else {
        return;
    };
    log(img, r, &header, &mut meta);
    let Some(regions) = region_table(img, r) else {
        return;
    };
    let find = |g: [u8; 16]| regions.iter().find(|e| e.0 == g).map(|e| (e.1, e.2));
    let (Some((bat_off, bat_len)), Some((md_off, md_len))) = (find(BAT), find(METADATA)) else {
        structure(r, "the region table lacks the BAT or the metadata region");
        return;
    };
    for &(g, off, len, _) in &regions {
        let what = if g == BAT { "BAT" } else { "metadata region" };
        if !off.is_multiple_of(MIB) || !img.contains(off, len) {
            structure(
                r,
                format!("the {what} at {off:#x} is outside the file or unaligned"),
            );
            return;
        }
        meta.add(off, len, what);
    }
    let Some(m) = metadata(img, r, md_off, md_len) else {
        return;
    };
    r.virtual_size = Some(m.size);
    meta.seal();
    if let Some((a, b, at)) = meta.first_overlap() {
        structure(r, format!("the {a} and the {b} overlap (at {at:#x})"));
        return;
    }
    bat(img, r, &m, bat_off, bat_len, &meta);
}

/// The valid header with the highest sequence number (qemu's choice), as bytes.
fn current_header(img: &Image<'_>, r: &mut Report) -> Option<Vec<u8>> {
    let mut best: Option<(u64, Vec<u8>)> = None;
    for off in [64 * KIB, 128 * KIB] {
        let Some(h) = img.read(off, 4 * KIB) else {
            continue;
        };
        if h.starts_with(b"head") && crc_ok(&h, 4) {
            let seq = h.le_u64(8).unwrap_or(0);
            if best.as_ref().is_none_or(|b| seq > b.0) {
                best = Some((seq, h));
            }
        }
    }
    let Some((_, h)) = best else {
        structure(r, "no valid VHDX header");
        return None;
    };
    if h.le_u16(66) != Some(1) {
        r.unsafe_("version", "unsupported VHDX version");
        return None;
    }
    Some(h)
}

/// A pending log: its writes would land anywhere in the file when replayed.
fn log(img: &Image<'_>, r: &mut Report, h: &[u8], meta: &mut Ranges) {
    let (len, off) = (
        u64::from(h.le_u32(68).unwrap_or(0)),
        h.le_u64(72).unwrap_or(0),
    );
    if !len.is_multiple_of(MIB) || !off.is_multiple_of(MIB) || (len > 0 && !img.contains(off, len))
    {
        structure(r, "the log is outside the file or unaligned");
        return;
    }
    meta.add(off, len, "log");
    if h.get(48..64).is_some_and(|g| g.iter().any(|&b| b != 0)) {
        r.unsafe_(
            "vhdx-log",
            "the log must be replayed before use (its writes are not inspected)",
        );
    }
}

/// A region table entry: GUID, file offset, length, required.
type Region = ([u8; 16], u64, u64, bool);

/// The first valid region table.
fn region_table(img: &Image<'_>, r: &mut Report) -> Option<Vec<Region>> {
    let table = [192 * KIB, 256 * KIB]
        .into_iter()
        .filter_map(|o| img.read(o, 64 * KIB))
        .find(|t| t.starts_with(b"regi") && crc_ok(t, 4));
    let Some(t) = table else {
        structure(r, "no valid region table");
        return None;
    };
    let count = t.le_u32(8).unwrap_or(0);
    if count > 2047 {
        structure(r, format!("{count} region table entries (at most 2047)"));
        return None;
    }
    let mut out = Vec::new();
    for i in 0..count as usize {
        let e = 16 + 32 * i;
        let g: [u8; 16] = t.array_at(e)?;
        let (off, len) = (t.le_u64(e + 16)?, u64::from(t.le_u32(e + 24)?));
        let required = t.le_u32(e + 28)? & 1 != 0;
        if g != BAT && g != METADATA {
            if required {
                r.unknown_feature(format!("VHDX required region {}", hex(&g)));
            }
            continue;
        }
        out.push((g, off, len, required));
    }
    Some(out)
}

fn hex(g: &[u8]) -> String {
    g.iter().map(|b| format!("{b:02x}")).collect()
}

/// The metadata table and the items diskimg and qemu need.
fn metadata(img: &Image<'_>, r: &mut Report, off: u64, len: u64) -> Option<Meta> {
    let t = img.read(off, 64 * KIB.min(len.max(32)))?;
    if !t.starts_with(b"metadata") {
        structure(r, "no metadata table signature");
        return None;
    }
    let count = t.le_u16(10).unwrap_or(0);
    if count > 2047 {
        structure(r, format!("{count} metadata entries (at most 2047)"));
        return None;
    }
    let mut m = Meta::default();
    let mut seen = 0u32;
    for i in 0..usize::from(count) {
        let e = 32 + 32 * i;
        let (Some(g), Some(io), Some(il), Some(fl)) = (
            t.array_at::<16>(e),
            t.le_u32(e + 16),
            t.le_u32(e + 20),
            t.le_u32(e + 24),
        ) else {
            structure(r, "the metadata table is truncated");
            return None;
        };
        let (io, il) = (u64::from(io), u64::from(il));
        if il > 0 && (io < 64 * KIB || io.saturating_add(il) > len) {
            structure(r, "a metadata item lies outside the metadata region");
            return None;
        }
        let item = img
            .read(off.saturating_add(io), il.min(MIB))
            .unwrap_or_default();
        match g {
            FILE_PARAMS => {
                m.block = u64::from(item.le_u32(0).unwrap_or(0));
                m.has_parent = item.le_u32(4).unwrap_or(0) & 2 != 0;
            }
            DISK_SIZE => m.size = item.le_u64(0).unwrap_or(0),
            LOGICAL => m.logical = u64::from(item.le_u32(0).unwrap_or(0)),
            PARENT => {
                parent_locator(r, &item);
                seen |= 1 << 5;
                continue;
            }
            DISK_ID | PHYSICAL => {}
            _ if fl & 4 != 0 => r.unknown_feature(format!("VHDX required metadata {}", hex(&g))),
            _ => continue,
        }
        seen |= match g {
            FILE_PARAMS => 1,
            DISK_SIZE => 2,
            LOGICAL => 4,
            _ => 0,
        };
    }
    if seen & 7 != 7 || !(MIB..=256 * MIB).contains(&m.block) || !m.block.is_power_of_two() {
        structure(
            r,
            "required metadata is missing or invalid (block size, size, sector size)",
        );
        return None;
    }
    if !matches!(m.logical, 512 | 4096) {
        structure(r, format!("invalid logical sector size {}", m.logical));
        return None;
    }
    if m.has_parent && seen & (1 << 5) == 0 {
        r.unsafe_(
            "parent-locator",
            "a differencing VHDX without a parent locator",
        );
    }
    Some(m)
}

/// Every path entry of the parent locator (MS-VHDX 2.6.2.6), and its linkage.
fn parent_locator(r: &mut Report, item: &[u8]) {
    let count = usize::from(item.le_u16(18).unwrap_or(0));
    let utf16 = |o: u32, l: u16| -> String {
        let o = o as usize;
        utf16(
            item.get(o..o.saturating_add(usize::from(l))).unwrap_or(&[]),
            false,
        )
    };
    let mut linkage = None;
    for i in 0..count.min(256) {
        let e = 20 + 12 * i;
        let (Some(ko), Some(vo), Some(kl), Some(vl)) = (
            item.le_u32(e),
            item.le_u32(e + 4),
            item.le_u16(e + 8),
            item.le_u16(e + 10),
        ) else {
            structure(r, "the parent locator is truncated");
            return;
        };
        let (key, value) = (utf16(ko, kl), utf16(vo, vl));
        match key.as_str() {
            "parent_linkage" => linkage = Some(value),
            "parent_linkage2" => {}
            _ => r.reference(ReferenceKind::ParentLocator, &value, Some(key)),
        }
    }
    let zero = |v: &str| v.chars().all(|c| matches!(c, '0' | '-' | '{' | '}'));
    if linkage.as_deref().is_none_or(zero) {
        r.unsafe_(
            "parent-locator",
            "the parent_linkage is missing or zero: no parent can be verified",
        );
    }
}

/// The BAT: every present block inside the file and outside the metadata.
fn bat(img: &Image<'_>, r: &mut Report, m: &Meta, off: u64, len: u64, meta: &Ranges) {
    let chunk = (1u64 << 23) * m.logical / m.block;
    let blocks = m.size.div_ceil(m.block);
    let entries = if m.has_parent {
        blocks.div_ceil(chunk.max(1)) * (chunk + 1)
    } else {
        blocks + blocks.saturating_sub(1) / chunk.max(1)
    };
    if entries.saturating_mul(8) > len || entries.saturating_mul(8) > img.limits.max_metadata_bytes
    {
        structure(
            r,
            "the BAT region is too small for the disk size (or beyond the limit)",
        );
        return;
    }
    let Some(t) = img.read(off, entries * 8) else {
        return;
    };
    for (i, e) in t
        .chunks_exact(8)
        .map(|c| c.le_u64(0).unwrap_or(0))
        .enumerate()
    {
        let state = e & 7;
        let at = (e >> 20).saturating_mul(MIB);
        let bitmap = (i as u64 + 1).is_multiple_of(chunk + 1);
        let present = if bitmap {
            state == 6
        } else {
            matches!(state, 6 | 7)
        };
        if !present {
            continue;
        }
        let n = if bitmap { MIB } else { m.block };
        if !img.contains(at, n) {
            structure(r, format!("a block at {at:#x} is outside the file"));
            return;
        }
        if let Some(what) = meta.hit(at, n) {
            structure(r, format!("a block at {at:#x} lies in the {what}"));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_mixed_endian() {
        let bat = [
            0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
            0x4A, 0x08,
        ];
        assert_eq!(BAT, bat);
        for g in [
            METADATA,
            FILE_PARAMS,
            DISK_SIZE,
            DISK_ID,
            LOGICAL,
            PHYSICAL,
            PARENT,
        ] {
            assert_ne!(g, [0; 16]);
        }
    }
}
