//! VHD, VHDX and VDI cases (qemu-iotests 088-style size limits, tables aimed at headers
//! and at each other, a pending VHDX log of garbage, a VHD whose parent is itself),
//! checksums recomputed so the corruption is reached.

use super::{Builder, Poke};

/// VHD checksum: one's complement of the byte sum with the field zeroed.
fn vhd_sum(v: &mut [u8], field: usize) {
    v[field..field + 4].fill(0);
    let s = v.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
    v[field..field + 4].copy_from_slice(&(!s).to_be_bytes());
}

/// CRC-32C (Castagnoli), bitwise: the VHDX checksum.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn vhdx_sum(v: &mut [u8], start: usize, len: usize) {
    v[start + 4..start + 8].fill(0);
    let c = crc32c(&v[start..start + len]);
    v[start + 4..start + 8].copy_from_slice(&c.to_le_bytes());
}

pub(super) fn cases(b: &mut Builder) {
    vhd(b);
    vhdx(b);
    vdi(b);
}

fn vhd(b: &mut Builder) {
    let base = b.qemu("h", "vpc", "", "64M");
    let n = base.len();
    let bat = base.be64_at(512 + 16) as usize;
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = base.clone();
        f(&mut v);
        vhd_sum(&mut v[512..1536], 36);
        vhd_sum(&mut v[..512], 64);
        let footer = v[..512].to_vec();
        v[n - 512..].copy_from_slice(&footer);
        v
    };
    let list: [(&str, &'static str, Vec<u8>); 8] = [
        (
            "h-bat-huge",
            "2^32-1 BAT entries",
            edit(&|v| v.be32(512 + 28, u32::MAX)),
        ),
        (
            "h-block-zero",
            "block size 0",
            edit(&|v| v.be32(512 + 32, 0)),
        ),
        (
            "h-block-odd",
            "block size 4097",
            edit(&|v| v.be32(512 + 32, 4097)),
        ),
        (
            "h-bat-eof",
            "BAT past the end",
            edit(&|v| v.be64(512 + 16, 1 << 50)),
        ),
        (
            "h-bat-footer",
            "BAT entry aimed at the footer copy",
            edit(&|v| v.be32(bat, 0)),
        ),
        (
            "h-bat-bat",
            "BAT entry aimed at the BAT",
            edit(&|v| v.be32(bat, (bat / 512) as u32)),
        ),
        (
            "h-header-eof",
            "dynamic header past the end",
            edit(&|v| v.be64(16, 1 << 50)),
        ),
        (
            "h-size-huge",
            "a disk of 2^60 bytes",
            edit(&|v| v.be64(48, 1 << 60)),
        ),
    ];
    for (name, what, bytes) in list {
        b.add(name, "vpc", what, true, &bytes);
    }
    // A differencing disk whose only parent locator names itself, with its own id.
    let mut v = base.clone();
    v.be32(60, 4);
    let uuid: [u8; 16] = v[68..84].try_into().unwrap();
    v[512 + 40..512 + 56].copy_from_slice(&uuid);
    let name: Vec<u8> = "h-diff-self.img"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let at = n - 512;
    v.truncate(at);
    v.extend_from_slice(&[0u8; 512]);
    v[at..at + name.len()].copy_from_slice(&name);
    let e = 512 + 576;
    v[e..e + 4].copy_from_slice(b"W2ru");
    v.be32(e + 4, 512);
    v.be32(e + 8, name.len() as u32);
    v.be64(e + 16, at as u64);
    vhd_sum(&mut v[512..1536], 36);
    vhd_sum(&mut v[..512], 64);
    let footer = v[..512].to_vec();
    v.extend_from_slice(&footer);
    b.add(
        "h-diff-self",
        "vpc",
        "a differencing VHD whose parent is itself",
        true,
        &v,
    );
}

fn vhdx(b: &mut Builder) {
    let base = b.qemu("x", "vhdx", "block_size=1M,log_size=1M", "8M");
    let rt = 192 * 1024;
    let count = base.le32_at(rt + 8) as usize;
    let (mut bat, mut meta) = (0usize, 0usize);
    for i in 0..count {
        let e = rt + 16 + 32 * i;
        let off = base.le64_at(e + 16) as usize;
        if base[e..e + 4] == [0x66, 0x77, 0xc2, 0x2d] {
            bat = e;
        } else {
            meta = off;
        }
    }
    let bat_off = base.le64_at(bat + 16) as usize;
    let fix = |v: &mut Vec<u8>| {
        vhdx_sum(v, rt, 64 * 1024);
        vhdx_sum(v, rt + 64 * 1024, 64 * 1024);
    };
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = base.clone();
        f(&mut v);
        fix(&mut v);
        v
    };
    let item = |v: &Vec<u8>, n: usize| meta + v.le32_at(meta + 32 + 32 * n + 16) as usize;
    let list: [(&str, &'static str, Vec<u8>); 8] = [
        (
            "x-regions-huge",
            "2^32-1 region entries",
            edit(&|v| v.le32(rt + 8, u32::MAX)),
        ),
        (
            "x-bat-len-huge",
            "a BAT region of 4 GiB",
            edit(&|v| v.le32(bat + 24, u32::MAX)),
        ),
        (
            "x-bat-eof",
            "BAT region past the end",
            edit(&|v| v.le64(bat + 16, 1 << 50)),
        ),
        (
            "x-meta-count",
            "65535 metadata entries",
            edit(&|v| v.le16(meta + 10, u16::MAX)),
        ),
        (
            "x-block-huge",
            "block size 2^31",
            edit(&|v| {
                let at = item(v, 0);
                v.le32(at, 1 << 31);
            }),
        ),
        (
            "x-size-huge",
            "a disk of 2^60 bytes",
            edit(&|v| {
                let at = item(v, 1);
                v.le64(at, 1 << 60);
            }),
        ),
        (
            "x-bat-into-meta",
            "BAT entry aimed at the metadata region",
            edit(&|v| {
                v.le64(bat_off, ((meta as u64 >> 20) << 20) | 6);
            }),
        ),
        (
            "x-bat-into-header",
            "BAT entry aimed at the headers",
            edit(&|v| v.le64(bat_off, 6)),
        ),
    ];
    for (name, what, bytes) in list {
        b.add(name, "vhdx", what, true, &bytes);
    }
    let mut v = base.clone();
    for h in [64 * 1024, 128 * 1024] {
        v[h + 48..h + 64].fill(0x5a);
        vhdx_sum(&mut v, h, 4096);
    }
    let log = v.le64_at(64 * 1024 + 72) as usize;
    let junk = crate::pattern(9, 1 << 20);
    v[log..log + (1 << 20)].copy_from_slice(&junk);
    b.add(
        "x-log-garbage",
        "vhdx",
        "a pending log full of garbage",
        true,
        &v,
    );
}

fn vdi(b: &mut Builder) {
    let base = b.qemu("d", "vdi", "", "16M");
    let bmap = base.le32_at(0x154) as usize;
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = base.clone();
        f(&mut v);
        v
    };
    let list: [(&str, &'static str, Vec<u8>); 6] = [
        (
            "d-blocks-huge",
            "2^31-1 blocks",
            edit(&|v| {
                v.le32(0x180, 0x7fff_ffff);
                v.le64(0x170, 0x7fff_ffff << 20);
            }),
        ),
        (
            "d-bmap-eof",
            "block map past the end",
            edit(&|v| v.le32(0x154, 0xffff_fe00)),
        ),
        (
            "d-entry-huge",
            "block map entry beyond the allocated blocks",
            edit(&|v| v.le32(bmap, 0x7fff_ffff)),
        ),
        (
            "d-data-eof",
            "data area past the end",
            edit(&|v| v.le32(0x158, 0xffff_fe00)),
        ),
        (
            "d-block-odd",
            "block size 4096",
            edit(&|v| v.le32(0x178, 4096)),
        ),
        ("d-block-zero", "block size 0", edit(&|v| v.le32(0x178, 0))),
    ];
    for (name, what, bytes) in list {
        b.add(name, "vdi", what, true, &bytes);
    }
}
