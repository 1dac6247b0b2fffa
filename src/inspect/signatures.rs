//! Every format signature in the file (qemu's probes plus ISO 9660/UDF, GPT/MBR and the
//! VHD footer), the format qemu would probe, and the rules for mixtures; raw content
//! rules (format_inspector's MBR/GPT checks); formats without an inspector.

use diskimg_blockio::bytes::ReadBytes;

use super::read::Image;
use super::{ReferenceKind, Report, Signature};

/// Signatures of content rather than of an image format: they may coexist (a hybrid ISO
/// has an MBR) and are read as raw by every tool.
const CONTENT: &[&str] = &["iso9660", "udf", "gpt", "mbr", "vpc-footer"];

/// qemu's magic for each image format it probes at offset 0 (block/*.c `*_probe`).
const MAGIC_AT_0: &[(&[u8], &str)] = &[
    (b"QED\0", "qed"),
    (b"KDMV", "vmdk"),
    (b"COWD", "vmdk"),
    (b"conectix", "vpc"),
    (b"vhdxfile", "vhdx"),
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"),
    (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
];

/// True for a text VMDK descriptor as qemu's `vmdk_probe` sees one (the first line that
/// is not a comment or blank is `version=N`), or as format_inspector does (printable
/// text naming a `createType`).
fn vmdk_text(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let first = text
        .split('\n')
        .map(|l| l.trim_matches([' ', '\t', '\r']))
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    if first.is_some_and(|l| l.starts_with("version=")) {
        return true;
    }
    let printable = head
        .iter()
        .take_while(|&&b| b != 0)
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    printable && text.to_ascii_lowercase().contains("createtype")
}

/// Finds every signature, records them in `r` and returns the format qemu would probe.
pub(crate) fn scan(img: &Image<'_>, r: &mut Report) -> &'static str {
    let head = img.read_upto(0, 4096);
    let mut found = Vec::new();
    if head.starts_with(b"QFI\xfb") {
        let v = head.be_u32(4).unwrap_or(0);
        found.push((if v == 1 { "qcow" } else { "qcow2" }, 0));
    }
    for (magic, name) in MAGIC_AT_0 {
        if head.starts_with(magic) {
            found.push((*name, 0));
        }
    }
    if head.le_u32(0x40) == Some(0xbeda_107f) {
        found.push(("vdi", 0x40));
    }
    if !found.iter().any(|f| f.0 == "vmdk")
        && vmdk_text(head.get(..head.len().min(1024)).unwrap_or(&[]))
    {
        found.push(("vmdk", 0));
    }
    let (tail_off, tail) = img.tail(512);
    if img.len >= 1024 && tail.starts_with(b"conectix") {
        found.push(("vpc-footer", tail_off));
    } else if img.len >= 1024 && tail.get(1..9) == Some(b"conectix".as_slice()) {
        found.push(("vpc-footer", tail_off + 1));
    }
    if img.len >= 1024 && tail.starts_with(b"koly") {
        found.push(("dmg", tail_off));
    }
    for k in 0..16u64 {
        let off = 0x8000 + k * 2048 + 1;
        match img.read_upto(off, 5).as_slice() {
            b"CD001" => found.push(("iso9660", off - 1)),
            b"NSR02" | b"NSR03" => found.push(("udf", off - 1)),
            _ => {}
        }
    }
    if head.get(510..512) == Some([0x55, 0xaa].as_slice()) && !is_fat(&head) {
        let gpt = head.get(512..520) == Some(b"EFI PART".as_slice())
            || img.read_upto(4096, 8) == b"EFI PART";
        found.push((if gpt { "gpt" } else { "mbr" }, 510));
    }
    found.sort_by_key(|f| f.1);
    found.dedup();
    r.signatures = found
        .iter()
        .map(|&(name, offset)| Signature { name, offset })
        .collect();
    found
        .iter()
        .map(|f| f.0)
        .find(|n| !CONTENT.contains(n))
        .unwrap_or("raw")
}

/// A FAT volume boot record looks like an MBR (format_inspector's exclusion: two FATs
/// and the fixed-disk media byte).
fn is_fat(sector: &[u8]) -> bool {
    sector.get(0x10) == Some(&2) && sector.get(0x15) == Some(&0xf8)
}

/// Judges the set of signatures for an image read as `format`.
pub(crate) fn judge_mixture(r: &mut Report, format: &str) {
    let images: Vec<&Signature> = r
        .signatures
        .iter()
        .filter(|s| !CONTENT.contains(&s.name))
        .collect();
    let contents: Vec<&Signature> = r
        .signatures
        .iter()
        .filter(|s| CONTENT.contains(&s.name) && s.name != "vpc-footer")
        .collect();
    let mut names: Vec<&str> = images.iter().map(|s| s.name).collect();
    names.dedup();
    if names.len() > 1 || (!names.is_empty() && !contents.is_empty()) {
        let all: Vec<String> = r
            .signatures
            .iter()
            .filter(|s| s.name != "vpc-footer")
            .map(|s| format!("{} at {}", s.name, s.offset))
            .collect();
        let msg = format!(
            "more than one format is present ({}): one may be hidden in the other",
            all.join(", ")
        );
        r.unsafe_("multiple-formats", msg);
    }
    let footer = r.signatures.iter().any(|s| s.name == "vpc-footer");
    if footer && format != "vpc" {
        r.note(
            "vpc-footer",
            "the file ends with a VHD footer: diskimg probes it as a fixed VHD (vpc), qemu as \
             raw; a fixed VHD names no other file",
        );
    }
}

/// Raw images: format_inspector's GPT/MBR rules when the first sector is an MBR.
pub(crate) fn inspect_raw(img: &Image<'_>, r: &mut Report) {
    r.virtual_size = Some(img.len);
    let Some(mbr) = img.read(0, 512) else {
        return;
    };
    if mbr.get(510..512) != Some([0x55, 0xaa].as_slice()) || is_fat(&mbr) {
        return;
    }
    let mut used = Vec::new();
    let mut gpt = false;
    for i in 0..4usize {
        let Some(pte) = mbr.get(446 + 16 * i..446 + 16 * (i + 1)) else {
            return;
        };
        let (boot, ostype) = (pte.first().copied(), pte.get(4).copied());
        if !matches!(boot, Some(0x00 | 0x80)) {
            r.unsafe_(
                "mbr",
                format!("MBR partition entry {i} has an invalid boot flag"),
            );
        }
        if ostype.is_some_and(|t| t != 0) {
            used.push(i);
        }
        if ostype == Some(0xee) {
            gpt = true;
            if pte.get(1..4) != Some([0, 2, 0].as_slice()) {
                r.unsafe_("mbr", "the GPT protective MBR has an invalid start CHS");
            }
            if pte.le_u32(8) != Some(1) {
                r.unsafe_("mbr", "the GPT protective MBR has an invalid start LBA");
            }
        }
    }
    if gpt && used != [0] {
        r.unsafe_("mbr", "the GPT protective MBR defines other partitions");
    }
    if used.is_empty() {
        r.unsafe_("mbr", "the MBR defines no partitions");
    }
}

/// Formats qemu probes but diskimg does not implement: banned (format_inspector's rule
/// for QED, and qcow v1 and Parallels, which can name other files), LUKS checked as
/// format_inspector does, the rest undecidable.
pub(crate) fn inspect_foreign(img: &Image<'_>, r: &mut Report, format: &str) {
    let head = img.read_upto(0, 592);
    match format {
        "qcow" => {
            let off = head.be_u64(8).unwrap_or(0);
            let len = head.be_u32(16).unwrap_or(0);
            if off != 0 {
                let name = img.read_upto(off, u64::from(len.min(1023)));
                let name = String::from_utf8_lossy(&name).into_owned();
                r.reference(ReferenceKind::BackingFile, &name, None);
            }
            r.unsafe_("banned-format", "qcow version 1 images are not allowed");
        }
        "qed" | "parallels" => {
            r.unsafe_("banned-format", format!("{format} images are not allowed"));
        }
        "luks" => {
            let version = head.be_u16(6).unwrap_or(0);
            if version != 1 {
                r.unsafe_("luks", format!("LUKS version {version} is not supported"));
            }
            r.encrypted("luks");
            let payload = head.be_u32(104).map(|s| u64::from(s) * 512);
            r.virtual_size = payload.map(|p| img.len.saturating_sub(p));
        }
        _ => r.unknown(
            "unsupported-format",
            format!("{format} images cannot be inspected by diskimg"),
        ),
    }
}
