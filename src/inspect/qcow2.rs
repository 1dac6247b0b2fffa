//! qcow2 (docs/interop/qcow2.txt): header, extensions, references, features, and every
//! table checked against the file and each other; L2 tables walked once each.

use std::collections::BTreeSet;

use diskimg_blockio::bytes::ReadBytes;

use super::ReferenceKind;
use super::Report;
use super::read::{Image, Ranges};

/// Incompatible feature bits qemu 10 knows: dirty, corrupt, external data file,
/// compression type, extended L2.
const INCOMPAT_KNOWN: u64 = 0x1f;
const INCOMPAT_NAMES: [&str; 5] = [
    "dirty",
    "corrupt",
    "external data file",
    "compression type",
    "extended L2 entries",
];
/// Host offsets in L1/L2 entries (bits 9–55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const MAX_SNAPSHOTS: u32 = 65536;

/// What the header and its extensions say.
#[derive(Default)]
struct Header {
    cs: u64,
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    rt_offset: u64,
    rt_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
    incompat: u64,
    extended_l2: bool,
    data_file: bool,
}

fn structure(r: &mut Report, msg: impl Into<String>) {
    r.unsafe_("structure", msg);
}

/// Inspects a qcow2 image.
pub(crate) fn inspect(img: &Image<'_>, r: &mut Report) {
    let Some(h) = header(img, r) else {
        return;
    };
    let mut meta = Ranges::default();
    meta.add(0, h.cs, "header");
    let l1 = tables(img, r, &h, &mut meta);
    let l2s = l2_tables(img, r, &h, &l1, &mut meta);
    meta.seal();
    if let Some((a, b, at)) = meta.first_overlap() {
        structure(r, format!("the {a} and the {b} overlap (at {at:#x})"));
    }
    walk_l2(img, r, &h, &l2s, &meta);
}

/// Parses and judges the header and its extensions; `None` when nothing more can be read.
fn header(img: &Image<'_>, r: &mut Report) -> Option<Header> {
    let Some(b) = img.read(0, 72) else {
        structure(r, "the qcow2 header is truncated");
        return None;
    };
    if !b.starts_with(b"QFI\xfb") {
        structure(r, "no qcow2 magic");
        return None;
    }
    let f32 = |o| b.be_u32(o).unwrap_or(0);
    let f64 = |o| b.be_u64(o).unwrap_or(0);
    let version = f32(4);
    if version != 2 && version != 3 {
        r.unsafe_("version", format!("unsupported qcow2 version {version}"));
        return None;
    }
    let cluster_bits = f32(20);
    if !(9..=21).contains(&cluster_bits) {
        structure(r, format!("unsupported cluster size 2^{cluster_bits}"));
        return None;
    }
    let cs = 1u64 << cluster_bits;
    let mut h = Header {
        cs,
        cluster_bits,
        size: f64(24),
        l1_size: f32(36),
        l1_offset: f64(40),
        rt_offset: f64(48),
        rt_clusters: f32(56),
        nb_snapshots: f32(60),
        snapshots_offset: f64(64),
        ..Header::default()
    };
    r.virtual_size = Some(h.size);
    let cluster = img.read_upto(0, cs);
    let mut ext_start = 72u64;
    if version == 3 {
        let (Some(incompat), Some(order), Some(hlen)) =
            (cluster.be_u64(72), cluster.be_u32(96), cluster.be_u32(100))
        else {
            structure(r, "the qcow2 version 3 header is truncated");
            return None;
        };
        h.incompat = incompat;
        h.extended_l2 = incompat & (1 << 4) != 0;
        h.data_file = incompat & (1 << 2) != 0;
        if order > 6 {
            structure(r, format!("refcount order {order} is beyond 6"));
        }
        if hlen < 104 || u64::from(hlen) > cs || !hlen.is_multiple_of(8) {
            structure(r, format!("invalid header length {hlen}"));
            return None;
        }
        ext_start = u64::from(hlen);
        if hlen > 104 && cluster.get(104).is_some_and(|&c| c > 1) {
            r.unsafe_("unknown-features", "unknown compression type");
        }
    }
    crypt(r, f32(32));
    let names = extensions(img, r, &h, &cluster, ext_start, f64(8));
    features(r, &h, &names);
    backing(
        r,
        &cluster,
        f64(8),
        f32(16),
        names.backing_format.as_deref(),
        cs,
    );
    if h.data_file || names.data_file.is_some() {
        let name = names.data_file.as_deref().unwrap_or("");
        let detail = h.data_file.then(|| "incompatible bit 2 set".to_string());
        r.reference(ReferenceKind::DataFile, name, detail);
    }
    Some(h)
}

fn crypt(r: &mut Report, method: u32) {
    match method {
        0 => {}
        1 => r.encrypted("qcow2 aes (legacy)"),
        2 => r.encrypted("qcow2 luks"),
        m => r.unsafe_("unknown-features", format!("unknown encryption method {m}")),
    }
}

fn backing(r: &mut Report, c: &[u8], off: u64, len: u32, fmt: Option<&str>, cs: u64) {
    if off == 0 {
        return;
    }
    let end = off.checked_add(u64::from(len));
    if len > 1023 || end.is_none_or(|e| e > cs) {
        structure(
            r,
            "the backing file name is too long or outside the first cluster",
        );
    }
    let name = usize::try_from(off)
        .ok()
        .and_then(|o| c.get(o..o.saturating_add(len.min(1023) as usize)))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .unwrap_or_default();
    let detail = fmt.map(|f| format!("format {f}"));
    r.reference(ReferenceKind::BackingFile, &name, detail);
}

/// What the header extensions name.
#[derive(Default)]
struct Names {
    backing_format: Option<String>,
    data_file: Option<String>,
    features: Vec<(u8, u8, String)>,
}

/// Walks the header extensions (spec "Header extensions").
fn extensions(
    img: &Image<'_>,
    r: &mut Report,
    h: &Header,
    c: &[u8],
    start: u64,
    backing_off: u64,
) -> Names {
    let mut n = Names::default();
    let end = if backing_off != 0 {
        backing_off.min(h.cs)
    } else {
        h.cs
    };
    let mut pos = usize::try_from(start).unwrap_or(usize::MAX);
    let end = usize::try_from(end).unwrap_or(0);
    while pos.saturating_add(8) <= end {
        let (Some(kind), Some(len)) = (c.be_u32(pos), c.be_u32(pos + 4)) else {
            break;
        };
        let len = len as usize;
        let data_end = pos + 8 + len;
        let Some(data) = c.get(pos + 8..data_end).filter(|_| data_end <= end) else {
            structure(r, "a header extension runs past the header area");
            break;
        };
        let text = || {
            String::from_utf8_lossy(data)
                .trim_end_matches('\0')
                .to_string()
        };
        match kind {
            0 => break,
            0xe279_2aca => n.backing_format = Some(text()),
            0x4441_5441 => n.data_file = Some(text()),
            0x6803_f857 => {
                for e in data.chunks_exact(48) {
                    let name = String::from_utf8_lossy(e.get(2..).unwrap_or(&[]));
                    let (t, bit) = (e.first().copied(), e.get(1).copied());
                    if let (Some(t), Some(bit)) = (t, bit) {
                        n.features
                            .push((t, bit, name.trim_end_matches('\0').to_string()));
                    }
                }
            }
            0x0537_be77 => {
                let (off, len) = (data.be_u64(0).unwrap_or(0), data.be_u64(8).unwrap_or(0));
                if !img.contains(off, len) || !off.is_multiple_of(h.cs) {
                    structure(r, "the LUKS header is outside the file");
                }
            }
            0x2385_2875 => {
                let (size, off) = (data.be_u64(8).unwrap_or(0), data.be_u64(16).unwrap_or(0));
                if !img.contains(off, size) {
                    structure(r, "the bitmap directory is outside the file");
                }
            }
            _ => {}
        }
        pos = data_end.next_multiple_of(8);
    }
    n
}

fn features(r: &mut Report, h: &Header, n: &Names) {
    let unknown = h.incompat & !INCOMPAT_KNOWN;
    for bit in 0..64u8 {
        if unknown & (1u64 << bit) == 0 {
            continue;
        }
        let named = n.features.iter().find(|f| f.0 == 0 && f.1 == bit);
        let name = match named {
            Some((_, _, s)) => format!("qcow2 incompatible bit {bit} ({s})"),
            None => format!("qcow2 incompatible bit {bit}"),
        };
        r.unknown_feature(name);
    }
    for (bit, name) in INCOMPAT_NAMES.iter().enumerate() {
        if bit < 2 && h.incompat & (1 << bit) != 0 {
            r.note("feature", format!("the image is marked {name}"));
        }
    }
}

/// Checks the L1, refcount and snapshot tables; returns the active L1 table.
fn tables(img: &Image<'_>, r: &mut Report, h: &Header, meta: &mut Ranges) -> Vec<u64> {
    let entries_per_l2 = h.cs / if h.extended_l2 { 16 } else { 8 };
    let need = h.size.div_ceil(entries_per_l2 * h.cs);
    if u64::from(h.l1_size) < need {
        structure(r, "the L1 table is too small for the virtual size");
    }
    let l1_bytes = u64::from(h.l1_size) * 8;
    let l1 = table(img, r, h, meta, h.l1_offset, l1_bytes, "L1 table");
    let rt_bytes = u64::from(h.rt_clusters) * h.cs;
    let rt = table(img, r, h, meta, h.rt_offset, rt_bytes, "refcount table");
    if h.rt_clusters == 0 {
        structure(r, "the refcount table is empty");
    }
    for &e in &rt {
        let off = e & !0x1ff;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(h.cs) || !img.contains(off, h.cs) {
            structure(
                r,
                format!("a refcount block at {off:#x} is outside the file"),
            );
            break;
        }
        meta.add(off, h.cs, "refcount block");
    }
    snapshots(img, r, h, meta);
    l1
}

/// Checks one table (aligned, inside the file, within limits) and reads it.
fn table(
    img: &Image<'_>,
    r: &mut Report,
    h: &Header,
    meta: &mut Ranges,
    off: u64,
    bytes: u64,
    what: &'static str,
) -> Vec<u64> {
    if bytes == 0 {
        return Vec::new();
    }
    if bytes > img.limits.max_metadata_bytes {
        r.unsafe_(
            "limits",
            format!("the {what} needs {bytes} bytes, beyond the limit"),
        );
        return Vec::new();
    }
    if !off.is_multiple_of(h.cs) || !img.contains(off, bytes) {
        structure(
            r,
            format!("the {what} at {off:#x} is outside the file or unaligned"),
        );
        return Vec::new();
    }
    meta.add(off, bytes, what);
    let raw = img.read(off, bytes).unwrap_or_default();
    raw.chunks_exact(8)
        .map(|c| c.be_u64(0).unwrap_or(0))
        .collect()
}

/// The snapshot table and each snapshot's L1 table (spec "Snapshots").
fn snapshots(img: &Image<'_>, r: &mut Report, h: &Header, meta: &mut Ranges) {
    if h.nb_snapshots == 0 {
        return;
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        structure(r, "too many snapshots");
        return;
    }
    if !h.snapshots_offset.is_multiple_of(h.cs) {
        structure(r, "the snapshot table is unaligned");
        return;
    }
    let mut pos = h.snapshots_offset;
    for i in 0..h.nb_snapshots {
        let Some(fixed) = img.read(pos, 40) else {
            structure(r, format!("snapshot {i} is outside the file"));
            return;
        };
        let l1_off = fixed.be_u64(0).unwrap_or(0);
        let l1_bytes = u64::from(fixed.be_u32(8).unwrap_or(0)) * 8;
        let id = u64::from(fixed.be_u16(12).unwrap_or(0));
        let name = u64::from(fixed.be_u16(14).unwrap_or(0));
        let extra = u64::from(fixed.be_u32(36).unwrap_or(0));
        if l1_bytes > 0 && (!l1_off.is_multiple_of(h.cs) || !img.contains(l1_off, l1_bytes)) {
            structure(
                r,
                format!("the L1 table of snapshot {i} is outside the file"),
            );
        }
        meta.add(l1_off, l1_bytes, "snapshot L1 table");
        pos = (pos + 40 + extra + id + name).next_multiple_of(8);
        if !img.contains(h.snapshots_offset, pos - h.snapshots_offset) {
            structure(r, "the snapshot table is outside the file");
            return;
        }
    }
    meta.add(
        h.snapshots_offset,
        pos - h.snapshots_offset,
        "snapshot table",
    );
}

/// The distinct L2 tables the active L1 table points to, checked.
fn l2_tables(
    img: &Image<'_>,
    r: &mut Report,
    h: &Header,
    l1: &[u64],
    meta: &mut Ranges,
) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for &e in l1 {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(h.cs) || !img.contains(off, h.cs) {
            structure(
                r,
                format!("an L2 table at {off:#x} is outside the file or unaligned"),
            );
            return BTreeSet::new();
        }
        if !out.insert(off) {
            // qemu never writes this; each guest range would share one table (issue 15
            // item 9: terabytes "allocated" by a few hundred KiB).
            structure(r, format!("two L1 entries share the L2 table at {off:#x}"));
            return BTreeSet::new();
        }
        meta.add(off, h.cs, "L2 table");
    }
    out
}

/// Reads each distinct L2 table once and checks where its clusters point.
fn walk_l2(img: &Image<'_>, r: &mut Report, h: &Header, l2s: &BTreeSet<u64>, meta: &Ranges) {
    let step = if h.extended_l2 { 16 } else { 8 };
    let csize_bits = h.cluster_bits.saturating_sub(8);
    let x = 62 - csize_bits;
    // Host clusters in use (at most one per L2 entry in the file): two guest clusters
    // sharing one is corruption qemu-img check reports (refcount 1, two references).
    let mut used = Vec::new();
    for &t in l2s {
        let Some(tab) = img.read(t, h.cs) else {
            continue;
        };
        for e in tab.chunks_exact(step).map(|c| c.be_u64(0).unwrap_or(0)) {
            let problem = if e & COMPRESSED != 0 {
                let off = e & ((1u64 << x) - 1);
                (off >= img.len).then_some("a compressed cluster lies outside the file")
            } else {
                let off = e & OFFSET_MASK;
                if off != 0 {
                    used.push(off);
                }
                if off == 0 || h.data_file {
                    None
                } else if !off.is_multiple_of(h.cs) {
                    Some("a data cluster is unaligned")
                } else if off >= img.len {
                    Some("a data cluster lies outside the file")
                } else if let Some(what) = meta.hit(off, h.cs) {
                    r.unsafe_(
                        "structure",
                        format!("a data cluster at {off:#x} lies in the {what}"),
                    );
                    return;
                } else {
                    None
                }
            };
            if let Some(p) = problem {
                structure(r, format!("{p} (L2 table at {t:#x})"));
                return;
            }
        }
    }
    used.sort_unstable();
    if let Some(w) = used.windows(2).find(|w| w.first() == w.get(1)) {
        let at = w.first().copied().unwrap_or(0);
        structure(
            r,
            format!("two guest clusters share the host cluster at {at:#x}"),
        );
    }
}
