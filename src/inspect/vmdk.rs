//! VMDK: the hosted sparse header (`KDMV`) with its embedded descriptor and footer, the
//! ESX `COWD` header, and text descriptors; format_inspector's descriptor and footer
//! rules; extents and `parentFileNameHint` as references; grain directory and grain
//! tables checked against the file.

use std::collections::BTreeSet;

use diskimg_blockio::bytes::ReadBytes;

use super::read::{Image, Ranges};
use super::{ReferenceKind, Report};

const SECTOR: u64 = 512;
const GD_AT_END: u64 = u64::MAX;
/// qemu reads at most 1 MiB - 1 of descriptor.
const MAX_DESC: u64 = (1 << 20) - 1;
const FLAG_RGD: u32 = 1 << 1;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;

fn structure(r: &mut Report, msg: impl Into<String>) {
    r.unsafe_("structure", msg);
}

/// Inspects a VMDK (sparse file or text descriptor).
pub(crate) fn inspect(img: &Image<'_>, r: &mut Report) {
    let head = img.read_upto(0, 512);
    if head.starts_with(b"KDMV") {
        sparse(img, r, &head);
    } else if head.starts_with(b"COWD") {
        cowd(img, r, &head);
    } else {
        let text = img.read_upto(0, MAX_DESC);
        let d = descriptor(r, &text);
        r.unsafe_(
            "vmdk-subformat",
            format!(
                "a descriptor file ({}): its data lives in other files",
                d.create_type.as_deref().unwrap_or("no createType")
            ),
        );
        references(r, &d, true);
    }
}

/// A descriptor as format_inspector and qemu read it.
#[derive(Default)]
struct Descriptor {
    create_type: Option<String>,
    parent_hint: Option<String>,
    /// (access, type, file, offset) of each extent line.
    extents: Vec<(String, String, String, String)>,
}

/// Parses descriptor text, applying format_inspector's line rules.
fn descriptor(r: &mut Report, raw: &[u8]) -> Descriptor {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let text = String::from_utf8_lossy(raw.get(..end).unwrap_or(&[]));
    let mut d = Descriptor::default();
    let mut bad_line = None;
    let mut slash = false;
    for line in text.lines().map(str::trim) {
        let lower = line.to_ascii_lowercase();
        let first = lower.split_whitespace().next().unwrap_or("");
        if line.is_empty() || line.starts_with('#') || lower.starts_with("ddb") {
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && !k.trim_end().contains(' ')
        {
            let v = v.trim().trim_matches('"').to_string();
            match k.trim() {
                "createType" => d.create_type = Some(v),
                "parentFileNameHint" => d.parent_hint = Some(v),
                _ => {}
            }
        } else if matches!(first, "rw" | "rdonly" | "noaccess") {
            slash |= line.contains('/');
            d.extents.push(extent_line(line));
        } else {
            bad_line.get_or_insert_with(|| line.chars().take(80).collect::<String>());
        }
    }
    if let Some(l) = bad_line {
        r.unsafe_(
            "vmdk-descriptor",
            format!("an unknown line in the descriptor: '{l}'"),
        );
    }
    if d.extents.is_empty() {
        r.unsafe_("vmdk-descriptor", "the descriptor names no extents");
    }
    if slash {
        r.unsafe_("vmdk-descriptor", "an extent file name contains '/'");
    }
    d
}

/// `ACCESS SECTORS TYPE "FILE" [OFFSET]`.
fn extent_line(line: &str) -> (String, String, String, String) {
    let mut it = line
        .splitn(4, char::is_whitespace)
        .filter(|s| !s.is_empty());
    let access = it.next().unwrap_or("").to_string();
    let _sectors = it.next();
    let kind = it.next().unwrap_or("").to_string();
    let rest = line.split_once(kind.as_str()).map_or("", |(_, r)| r).trim();
    let (file, offset) = match rest.strip_prefix('"').and_then(|x| x.split_once('"')) {
        Some((f, o)) => (f.to_string(), o.trim().to_string()),
        None => {
            let mut p = rest.splitn(2, char::is_whitespace);
            let f = p.next().unwrap_or("").to_string();
            (f, p.next().unwrap_or("").trim().to_string())
        }
    };
    (access, kind, file, offset)
}

/// Records the files a descriptor makes qemu open: every extent with a file (when
/// `extents_open`) and the parent named by `parentFileNameHint`.
fn references(r: &mut Report, d: &Descriptor, extents_open: bool) {
    if extents_open {
        for (access, kind, file, offset) in &d.extents {
            if kind.eq_ignore_ascii_case("ZERO") {
                continue;
            }
            let detail = if offset.is_empty() {
                format!("{kind}, {access}")
            } else {
                format!("{kind}, {access}, offset {offset}")
            };
            r.reference(ReferenceKind::Extent, file, Some(detail));
        }
    }
    if let Some(p) = &d.parent_hint {
        r.reference(
            ReferenceKind::BackingFile,
            p,
            Some("parentFileNameHint".into()),
        );
    }
}

/// A hosted sparse extent (monolithicSparse, streamOptimized).
fn sparse(img: &Image<'_>, r: &mut Report, h: &[u8]) {
    let f32 = |o| h.le_u32(o).unwrap_or(0);
    let f64 = |o| h.le_u64(o).unwrap_or(0);
    let (version, flags, capacity, grain) = (f32(4), f32(8), f64(12), f64(20));
    let (desc_off, desc_size, gtes, mut gd) = (f64(28), f64(36), f32(44), f64(56));
    if !(1..=3).contains(&version) {
        r.unsafe_("version", format!("unsupported VMDK version {version}"));
        return;
    }
    r.virtual_size = capacity.checked_mul(SECTOR);
    if desc_off.checked_mul(SECTOR) != Some(0x200) {
        r.unsafe_("vmdk-descriptor", "the descriptor is not at sector 1");
    }
    let text = img.read_upto(
        desc_off.saturating_mul(SECTOR),
        desc_size.saturating_mul(SECTOR).min(MAX_DESC),
    );
    let d = descriptor(r, &text);
    let ty = d.create_type.as_deref().unwrap_or("").to_ascii_lowercase();
    if ty != "monolithicsparse" && ty != "streamoptimized" {
        r.unsafe_(
            "vmdk-subformat",
            format!(
                "unsupported subformat '{}'",
                d.create_type.as_deref().unwrap_or("")
            ),
        );
    }
    // A zero-capacity sparse header with a descriptor makes qemu open the descriptor's
    // extents (vmdk_open_vmdk4): the "descriptor in a sparse header" trick.
    references(r, &d, capacity == 0 && desc_off != 0);
    if gd == GD_AT_END {
        match footer(img, r, h) {
            Some(g) => gd = g,
            None => return,
        }
    }
    if gtes != 512 {
        structure(
            r,
            format!("{gtes} entries per grain table (qemu requires 512)"),
        );
        return;
    }
    if grain == 0 || !grain.is_power_of_two() || grain > 0x20_0000 {
        structure(r, format!("invalid grain size of {grain} sectors"));
        return;
    }
    let mut meta = Ranges::default();
    meta.add(0, SECTOR, "header");
    meta.add(
        desc_off.saturating_mul(SECTOR),
        desc_size.saturating_mul(SECTOR),
        "descriptor",
    );
    let gd_entries = capacity.div_ceil(grain * u64::from(gtes));
    let mut dirs = vec![gd];
    if flags & FLAG_RGD != 0 {
        dirs.push(f64(48));
    }
    let zero_ok = flags & FLAG_ZERO_GRAIN != 0;
    let compressed = flags & FLAG_COMPRESSED != 0;
    grain_tables(
        img, r, &mut meta, &dirs, gd_entries, 512, grain, zero_ok, compressed,
    );
}

/// format_inspector's footer rules for a grain directory at the end (`GD_AT_END`);
/// returns the footer's grain directory.
fn footer(img: &Image<'_>, r: &mut Report, h: &[u8]) -> Option<u64> {
    let (_, f) = img.tail(1536);
    if f.len() < 1536 {
        structure(r, "the footer is missing");
        return None;
    }
    let marker = |o: usize| (f.le_u64(o), f.le_u32(o + 8), f.le_u32(o + 12));
    let pad_zero = |o: usize| {
        f.get(o + 16..o + 512)
            .is_some_and(|p| p.iter().all(|&b| b == 0))
    };
    let footer = f.get(512..1024).unwrap_or(&[]);
    let same = |a: usize, n: usize| h.get(a..a + n) == footer.get(a..a + n);
    if !same(0, 4) || !same(4, 4) || !same(28, 16) {
        r.unsafe_("vmdk-footer", "the footer does not match the header");
    }
    let gd = footer.le_u64(56).unwrap_or(GD_AT_END);
    if gd == GD_AT_END {
        r.unsafe_("vmdk-footer", "the footer points to another footer");
        return None;
    }
    if !matches!(marker(0), (Some(_), Some(0), Some(3))) || !pad_zero(0) {
        r.unsafe_("vmdk-footer", "the footer marker is invalid");
    }
    if marker(1024) != (Some(0), Some(0), Some(0)) || !pad_zero(1024) {
        r.unsafe_("vmdk-footer", "the end-of-stream marker is invalid");
    }
    Some(gd)
}

/// An ESX `COWD` sparse extent (4096 entries per grain table).
fn cowd(img: &Image<'_>, r: &mut Report, h: &[u8]) {
    let f32 = |o| u64::from(h.le_u32(o).unwrap_or(0));
    let (sectors, grain, gd, gd_entries) = (f32(12), f32(16), f32(20), f32(24));
    r.virtual_size = Some(sectors * SECTOR);
    if grain == 0 || grain > 0x20_0000 {
        structure(r, format!("invalid grain size of {grain} sectors"));
        return;
    }
    let need = sectors.div_ceil(grain * 4096);
    if gd_entries < need {
        structure(r, "the grain directory is too small for the capacity");
    }
    let mut meta = Ranges::default();
    meta.add(0, 2048, "header");
    grain_tables(
        img,
        r,
        &mut meta,
        &[gd],
        gd_entries,
        4096,
        grain,
        false,
        false,
    );
}

/// Checks grain directories (sector offsets `dirs`) of `entries` entries, their grain
/// tables (`gtes` entries each, each table read once) and where the grains lie.
#[allow(clippy::too_many_arguments)]
fn grain_tables(
    img: &Image<'_>,
    r: &mut Report,
    meta: &mut Ranges,
    dirs: &[u64],
    entries: u64,
    gtes: u64,
    grain: u64,
    zero_ok: bool,
    compressed: bool,
) {
    let gd_bytes = entries.saturating_mul(4);
    if gd_bytes > img.limits.max_metadata_bytes {
        r.unsafe_(
            "limits",
            format!("the grain directory needs {gd_bytes} bytes, beyond the limit"),
        );
        return;
    }
    let mut tables = BTreeSet::new();
    for &d in dirs {
        let off = d.saturating_mul(SECTOR);
        let Some(gd) = img.read(off, gd_bytes) else {
            structure(
                r,
                format!("the grain directory at {off:#x} is outside the file"),
            );
            return;
        };
        meta.add(off, gd_bytes, "grain directory");
        for e in gd
            .chunks_exact(4)
            .map(|c| u64::from(c.le_u32(0).unwrap_or(0)))
        {
            if e == 0 {
                continue;
            }
            let t = e * SECTOR;
            if !img.contains(t, gtes * 4) {
                structure(r, format!("a grain table at {t:#x} is outside the file"));
                return;
            }
            if tables.insert(t) {
                meta.add(t, gtes * 4, "grain table");
            }
        }
    }
    meta.seal();
    if let Some((a, b, at)) = meta.first_overlap() {
        structure(r, format!("the {a} and the {b} overlap (at {at:#x})"));
        return;
    }
    for &t in &tables {
        let Some(gt) = img.read(t, gtes * 4) else {
            continue;
        };
        for e in gt
            .chunks_exact(4)
            .map(|c| u64::from(c.le_u32(0).unwrap_or(0)))
        {
            if e == 0 || (e == 1 && zero_ok) {
                continue;
            }
            let off = e * SECTOR;
            if off >= img.len {
                structure(r, format!("a grain at {off:#x} lies outside the file"));
                return;
            }
            let len = if compressed { SECTOR } else { grain * SECTOR };
            if let Some(what) = meta.hit(off, len) {
                structure(r, format!("a grain at {off:#x} lies in the {what}"));
                return;
            }
        }
    }
}
