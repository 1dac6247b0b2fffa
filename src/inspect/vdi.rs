//! VDI (VirtualBox; qemu `block/vdi.c`): header fields qemu insists on, the block map
//! and where its blocks lie. A VDI names no other file (a differencing VDI names its
//! parent by UUID only, and neither diskimg nor qemu opens one).

use diskimg_blockio::bytes::ReadBytes;

use super::Report;
use super::read::{Image, Ranges};

const MIB: u64 = 1 << 20;
const UNALLOCATED: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;

fn structure(r: &mut Report, msg: impl Into<String>) {
    r.unsafe_("structure", msg);
}

/// Inspects a VDI.
pub(crate) fn inspect(img: &Image<'_>, r: &mut Report) {
    let Some(h) = img.read(0, 0x1c8) else {
        structure(r, "the VDI header is truncated");
        return;
    };
    let f32 = |o| u64::from(h.le_u32(o).unwrap_or(0));
    if f32(0x40) != 0xbeda_107f {
        structure(r, "no VDI signature");
        return;
    }
    if f32(0x44) != 0x0001_0001 {
        r.unsafe_(
            "version",
            format!("unsupported VDI version {:#x}", f32(0x44)),
        );
        return;
    }
    let kind = f32(0x4c);
    if kind != 1 && kind != 2 {
        structure(
            r,
            format!("unsupported VDI image type {kind} (differencing or undo)"),
        );
        return;
    }
    let (bmap, data) = (f32(0x154), f32(0x158));
    let size = h.le_u64(0x170).unwrap_or(0);
    let (block, extra, blocks, allocated) = (f32(0x178), f32(0x17c), f32(0x180), f32(0x184));
    r.virtual_size = Some(size);
    if block != MIB || extra != 0 || f32(0x168) != 512 {
        structure(r, "unsupported VDI block or sector size");
        return;
    }
    if !bmap.is_multiple_of(512) || !data.is_multiple_of(512) {
        structure(r, "the block map or data offset is not sector-aligned");
        return;
    }
    if blocks.saturating_mul(block) < size || allocated > blocks {
        structure(r, "the block counts do not cover the disk size");
        return;
    }
    for (what, at) in [("link", 0x1a8), ("parent", 0x1b8)] {
        if h.get(at..at + 16)
            .is_some_and(|u| u.iter().any(|&b| b != 0))
        {
            structure(r, format!("a non-null {what} UUID (qemu refuses it)"));
        }
    }
    let map_bytes = blocks * 4;
    if map_bytes > img.limits.max_metadata_bytes {
        r.unsafe_(
            "limits",
            format!("the block map needs {map_bytes} bytes, beyond the limit"),
        );
        return;
    }
    let Some(map) = img.read(bmap, map_bytes) else {
        structure(r, "the block map is outside the file");
        return;
    };
    let mut meta = Ranges::default();
    meta.add(0, 0x1c8, "header");
    meta.add(bmap, map_bytes, "block map");
    meta.seal();
    if data < bmap.saturating_add(map_bytes) && map_bytes > 0 {
        structure(r, "the data area starts inside the block map");
        return;
    }
    for e in map
        .chunks_exact(4)
        .map(|c| c.le_u32(0).unwrap_or(UNALLOCATED))
    {
        if e == UNALLOCATED || e == ZERO {
            continue;
        }
        let i = u64::from(e);
        if i >= allocated {
            structure(
                r,
                format!("block map entry {i} is beyond the allocated blocks"),
            );
            return;
        }
        let at = data + i * block;
        if !img.contains(at, block) {
            structure(r, format!("a block at {at:#x} is outside the file"));
            return;
        }
        if let Some(what) = meta.hit(at, block) {
            structure(r, format!("a block at {at:#x} lies in the {what}"));
            return;
        }
    }
}
