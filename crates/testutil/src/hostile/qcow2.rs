//! qcow2 cases: qemu-iotests 080's header corruptions (table sizes and offsets, cluster
//! bits, header length, snapshots, extensions, backing name), 060's overlaps (L1/L2 and
//! refcount structures aimed at the header and at each other), issue 15 item 9 (every
//! L1 entry aimed at one full L2 table: terabytes "allocated" in a few hundred KiB),
//! unknown features, compressed clusters pointing away.

use super::{Builder, Poke};

const COPIED: u64 = 1 << 63;

/// Header field offsets (docs/interop/qcow2.txt).
const L1_SIZE: usize = 36;
const L1_OFF: usize = 40;
const RT_OFF: usize = 48;
const RT_CLUSTERS: usize = 56;
const NB_SNAP: usize = 60;
const SNAP_OFF: usize = 64;

pub(super) fn cases(b: &mut Builder) {
    let base = b.qemu("q", "qcow2", "", "64M");
    let at = Offsets::of(&base);
    header_cases(b, &at, &|f| edited(&base, f));
    table_cases(b, &at, &|f| edited(&base, f));
    item9(b);
}

/// Where the tables of the base image are, and its length.
struct Offsets {
    l1: usize,
    rt: usize,
    l2: usize,
    len: u64,
}

impl Offsets {
    fn of(base: &Vec<u8>) -> Self {
        let l1 = base.be64_at(L1_OFF) as usize;
        Offsets {
            l1,
            rt: base.be64_at(RT_OFF) as usize,
            l2: (base.be64_at(l1) & 0x00ff_ffff_ffff_fe00) as usize,
            len: base.len() as u64,
        }
    }
}

/// A copy of `base` changed by `f`.
fn edited(base: &[u8], f: &dyn Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = base.to_vec();
    f(&mut v);
    v
}

/// A copy of the base image changed by the function given.
type Edit<'a> = dyn Fn(&dyn Fn(&mut Vec<u8>)) -> Vec<u8> + 'a;

/// qemu-iotests 080's header corruptions and unknown features.
fn header_cases(b: &mut Builder, at: &Offsets, edit: &Edit<'_>) {
    let Offsets { l1, len, .. } = *at;
    let header: [(&str, &'static str, Vec<u8>); 17] = [
        (
            "q-l1-huge",
            "L1 table of 2^28 entries",
            edit(&|v| v.be32(L1_SIZE, 0x1000_0000)),
        ),
        (
            "q-l1-max",
            "L1 size 0xffffffff",
            edit(&|v| v.be32(L1_SIZE, u32::MAX)),
        ),
        (
            "q-l1-eof",
            "L1 table past the end",
            edit(&|v| v.be64(L1_OFF, len + 0x10000)),
        ),
        (
            "q-l1-unaligned",
            "L1 table unaligned",
            edit(&|v| v.be64(L1_OFF, l1 as u64 + 512)),
        ),
        (
            "q-l1-header",
            "L1 table on the header",
            edit(&|v| v.be64(L1_OFF, 0)),
        ),
        (
            "q-rt-huge",
            "refcount table of 2^24 clusters",
            edit(&|v| v.be32(RT_CLUSTERS, 0xff_ffff)),
        ),
        (
            "q-rt-eof",
            "refcount table past the end",
            edit(&|v| v.be64(RT_OFF, len << 4)),
        ),
        (
            "q-rt-header",
            "refcount table on the header",
            edit(&|v| v.be64(RT_OFF, 0)),
        ),
        (
            "q-rt-zero",
            "no refcount table",
            edit(&|v| v.be32(RT_CLUSTERS, 0)),
        ),
        (
            "q-snap-huge",
            "2^32-1 snapshots",
            edit(&|v| {
                v.be32(NB_SNAP, u32::MAX);
                v.be64(SNAP_OFF, l1 as u64);
            }),
        ),
        (
            "q-snap-eof",
            "snapshot table past the end",
            edit(&|v| {
                v.be32(NB_SNAP, 1);
                v.be64(SNAP_OFF, len + 0x10000);
            }),
        ),
        ("q-cbits-8", "cluster_bits 8", edit(&|v| v.be32(20, 8))),
        ("q-cbits-63", "cluster_bits 63", edit(&|v| v.be32(20, 63))),
        ("q-hlen-small", "header length 8", edit(&|v| v.be32(100, 8))),
        (
            "q-hlen-huge",
            "header length 2^32-1",
            edit(&|v| v.be32(100, u32::MAX)),
        ),
        (
            "q-backing-huge",
            "backing name offset/size out of range",
            edit(&|v| {
                v.be64(8, 0xffff_ffff_ffff);
                v.be32(16, u32::MAX);
            }),
        ),
        (
            "q-incompat",
            "unknown incompatible bit 40",
            edit(&|v| v.be64(72, 1 << 40)),
        ),
    ];
    for (name, what, bytes) in header {
        b.add(name, "qcow2", what, true, &bytes);
    }
}

/// qemu-iotests 060's overlaps and tables pointing away.
fn table_cases(b: &mut Builder, at: &Offsets, edit: &Edit<'_>) {
    let Offsets { l1, rt, l2, len } = *at;
    let tables: [(&str, &'static str, Vec<u8>); 9] = [
        (
            "q-l2-is-l1",
            "L1 entry aimed at the L1 table (a loop)",
            edit(&|v| v.be64(l1, l1 as u64 | COPIED)),
        ),
        (
            "q-l2-is-header",
            "L1 entry aimed at the header cluster's neighbour (refcount table)",
            edit(&|v| v.be64(l1, rt as u64 | COPIED)),
        ),
        (
            "q-l2-eof",
            "L2 table past the end",
            edit(&|v| v.be64(l1, (len << 2) | COPIED)),
        ),
        (
            "q-data-is-l1",
            "data cluster aimed at the L1 table",
            edit(&|v| v.be64(l2, l1 as u64 | COPIED)),
        ),
        (
            "q-data-is-rt",
            "data cluster aimed at the refcount table",
            edit(&|v| v.be64(l2, rt as u64 | COPIED)),
        ),
        (
            "q-data-eof",
            "data cluster past the end",
            edit(&|v| v.be64(l2, (len << 3) | COPIED)),
        ),
        (
            "q-compressed-eof",
            "compressed cluster past the end",
            edit(&|v| v.be64(l2, (1 << 62) | 0x3fff_ffff_ffff)),
        ),
        (
            "q-refblock-is-l1",
            "refcount block aimed at the L1 table",
            edit(&|v| v.be64(rt, l1 as u64)),
        ),
        (
            "q-ext-huge",
            "header extension of 2^32-1 bytes",
            edit(&|v| v.be32(112 + 4, u32::MAX)),
        ),
    ];
    for (name, what, bytes) in tables {
        b.add(name, "qcow2", what, true, &bytes);
    }
}

/// Issue 15 item 9: a 4 TiB image whose 8192 L1 entries all point to one L2 table whose
/// 8192 entries all point to one data cluster.
fn item9(b: &mut Builder) {
    let mut v = b.qemu("q9", "qcow2", "", "4T");
    let l1 = v.be64_at(L1_OFF) as usize;
    let n = v.be32_at(L1_SIZE) as usize;
    let e = v.be64_at(l1);
    let l2 = (e & 0x00ff_ffff_ffff_fe00) as usize;
    let d = v.be64_at(l2);
    for i in 0..n {
        v.be64(l1 + 8 * i, e);
    }
    for i in 0..8192 {
        v.be64(l2 + 8 * i, d);
    }
    b.add(
        "q-item9",
        "qcow2",
        "every L1 entry aimed at one full L2 table",
        true,
        &v,
    );
}
