//! VHD (qemu's `vpc`; Virtual Hard Disk Image Format Specification): footer, dynamic
//! header, block allocation table and, for differencing disks, every parent locator
//! (W2ru, W2ku, MacX, …) and the parent's unicode name as references.

use diskimg_blockio::bytes::ReadBytes;

use super::read::{Image, Ranges, utf16};
use super::{ReferenceKind, Report};

const FOOTER: u64 = 512;
const UNUSED: u32 = u32::MAX;

fn structure(r: &mut Report, msg: impl Into<String>) {
    r.unsafe_("structure", msg);
}

/// The VHD checksum: one's complement of the byte sum, the checksum field taken as 0.
fn checksum_ok(b: &[u8], field: usize) -> bool {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    b.be_u32(field) == Some(!sum)
}

/// Inspects a VHD.
pub(crate) fn inspect(img: &Image<'_>, r: &mut Report) {
    // qemu reads the copy at offset 0 first, then the footer at the end.
    let head = img.read_upto(0, FOOTER);
    let (tail_at, tail) = img.tail(FOOTER);
    let (at, footer) = if head.starts_with(b"conectix") {
        (0, head)
    } else if tail.starts_with(b"conectix") {
        (tail_at, tail)
    } else {
        structure(r, "no VHD footer");
        return;
    };
    if !checksum_ok(&footer, 64) {
        structure(r, format!("the footer checksum at {at:#x} is wrong"));
    }
    let size = footer.be_u64(48).unwrap_or(0);
    r.virtual_size = Some(size);
    let kind = footer.be_u32(60).unwrap_or(0);
    match kind {
        2 => {
            if img.len < size.saturating_add(FOOTER) && at != 0 {
                structure(r, "the fixed VHD is shorter than its size");
            }
        }
        3 | 4 => dynamic(img, r, &footer, size, kind == 4),
        k => structure(r, format!("unknown VHD disk type {k}")),
    }
}

fn dynamic(img: &Image<'_>, r: &mut Report, footer: &[u8], size: u64, diff: bool) {
    let off = footer.be_u64(16).unwrap_or(u64::MAX);
    let Some(h) = img.read(off, 1024) else {
        structure(
            r,
            format!("the dynamic header at {off:#x} is outside the file"),
        );
        return;
    };
    if !h.starts_with(b"cxsparse") {
        structure(r, "no dynamic header");
        return;
    }
    if !checksum_ok(&h, 36) {
        structure(r, "the dynamic header checksum is wrong");
    }
    let bat = h.be_u64(16).unwrap_or(u64::MAX);
    let entries = u64::from(h.be_u32(28).unwrap_or(0));
    let block = u64::from(h.be_u32(32).unwrap_or(0));
    if block < 512 || !block.is_power_of_two() {
        structure(r, format!("invalid block size {block}"));
        return;
    }
    if entries.saturating_mul(block) < size {
        structure(
            r,
            "the block allocation table is too small for the disk size",
        );
    }
    if diff {
        parents(img, r, &h);
    }
    let mut meta = Ranges::default();
    meta.add(0, FOOTER, "footer copy");
    meta.add(off, 1024, "dynamic header");
    meta.add(img.len.saturating_sub(FOOTER), FOOTER, "footer");
    let bat_bytes = (entries * 4).next_multiple_of(512);
    if bat_bytes > img.limits.max_metadata_bytes {
        r.unsafe_(
            "limits",
            format!("the BAT needs {bat_bytes} bytes, beyond the limit"),
        );
        return;
    }
    let Some(table) = img.read(bat, entries * 4) else {
        structure(r, format!("the BAT at {bat:#x} is outside the file"));
        return;
    };
    meta.add(bat, bat_bytes, "BAT");
    for i in 0..8usize {
        let e = 576 + i * 24;
        if h.be_u32(e).unwrap_or(0) != 0 {
            let len = u64::from(h.be_u32(e + 8).unwrap_or(0));
            meta.add(h.be_u64(e + 16).unwrap_or(0), len, "parent locator");
        }
    }
    meta.seal();
    if let Some((a, b, at)) = meta.first_overlap() {
        structure(r, format!("the {a} and the {b} overlap (at {at:#x})"));
        return;
    }
    let bitmap = (block / 512 / 8).next_multiple_of(512);
    for e in table.chunks_exact(4).map(|c| c.be_u32(0).unwrap_or(UNUSED)) {
        if e == UNUSED {
            continue;
        }
        let start = u64::from(e) * 512;
        if !img.contains(start, bitmap + block) {
            structure(r, format!("a data block at {start:#x} is outside the file"));
            return;
        }
        if let Some(what) = meta.hit(start, bitmap + block) {
            structure(r, format!("a data block at {start:#x} lies in the {what}"));
            return;
        }
    }
}

/// Every parent locator and the parent's unicode name of a differencing VHD.
fn parents(img: &Image<'_>, r: &mut Report, h: &[u8]) {
    let name = utf16(h.get(64..576).unwrap_or(&[]), true);
    let n = name.split('\0').next().unwrap_or("");
    let mut any = false;
    if !n.is_empty() {
        r.reference(
            ReferenceKind::ParentLocator,
            n,
            Some("parent unicode name".into()),
        );
        any = true;
    }
    for i in 0..8usize {
        let e = 576 + i * 24;
        let code = h.get(e..e + 4).unwrap_or(&[0; 4]);
        if code == [0; 4] {
            continue;
        }
        let len = u64::from(h.be_u32(e + 8).unwrap_or(0));
        let off = h.be_u64(e + 16).unwrap_or(0);
        let kind = String::from_utf8_lossy(code).into_owned();
        let Some(data) = img.read(off, len.min(64 << 10)) else {
            structure(r, format!("the {kind} parent locator is outside the file"));
            continue;
        };
        let text = if code == b"MacX" {
            String::from_utf8_lossy(&data).into_owned()
        } else {
            utf16(&data, false)
        };
        r.reference(
            ReferenceKind::ParentLocator,
            text.trim_end_matches('\0'),
            Some(format!("{kind} locator")),
        );
        any = true;
    }
    if !any {
        r.unsafe_(
            "parent-locator",
            "a differencing VHD without a usable parent locator",
        );
    }
}
