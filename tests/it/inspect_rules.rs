//! format_inspector's per-format rules (VMDK descriptor lines, footer markers, header
//! checks; MBR/GPT partition checks), each case of its test suite on a qemu-made image
//! or a hand-made sector, and the CVE images (CVE-2022-47951, CVE-2024-32498,
//! CVE-2024-40767, CVE-2026-24708).

use std::path::{Path, PathBuf};

use diskimg::{Format, ImageOptions, OpenPolicy, OptionList, ReferenceKind, Verdict, create};
use diskimg_testutil::{qemu_create_overlay, qemu_img_ok, tempdir};

use crate::inspect::{assert_verdict, check, has, patch, qemu_create, s};

/// A monolithicSparse image whose embedded descriptor is `lines`.
fn with_descriptor(dir: &Path, lines: &[&str]) -> PathBuf {
    let p = qemu_create(dir, "d.vmdk", "vmdk", "", "5M");
    let mut text = lines.join("\n").into_bytes();
    text.resize(20 * 512, 0);
    patch(&p, 512, &text);
    p
}

/// `test_vmdk_safety_checks`, line by line.
#[test]
fn vmdk_descriptor_lines() {
    let dir = tempdir();
    let mut lines = vec![
        "# a comment",
        "createType monolithicFlat",
        "",
        " ",
        "someUnknownThing=foo",
        "ddb whatever",
        "rw 0 somefile.vmdk",
    ];
    let r = check(&with_descriptor(dir.path(), &lines), None);
    assert!(
        has(&r, "vmdk-subformat", "unsupported subformat"),
        "{:?}",
        r.findings
    );
    lines[1] = "createType=\"monolithicFlat\"";
    let r = check(&with_descriptor(dir.path(), &lines), None);
    assert!(has(&r, "vmdk-subformat", "monolithicFlat"));
    lines[1] = "createType=\"monolithicSparse\"";
    let r = check(&with_descriptor(dir.path(), &lines), None);
    assert_verdict(&r, Verdict::Safe, "fixed createType");
    lines.push("wronly 2048 somefile2.vmdk");
    let r = check(&with_descriptor(dir.path(), &lines), None);
    assert!(
        has(&r, "vmdk-descriptor", "unknown line"),
        "{:?}",
        r.findings
    );
    *lines.last_mut().unwrap() = "rw 2048 /etc/hosts";
    let r = check(&with_descriptor(dir.path(), &lines), None);
    assert!(has(&r, "vmdk-descriptor", "contains '/'"));
    lines.pop();
    lines.pop();
    let r = check(&with_descriptor(dir.path(), &lines), None);
    assert!(has(&r, "vmdk-descriptor", "no extents"));
    // `test_vmdk_invalid_type`.
    let r = check(
        &with_descriptor(
            dir.path(),
            &[
                "createType=\"someunknownformat\"",
                "RW 10240 SPARSE \"d.vmdk\"",
            ],
        ),
        None,
    );
    assert!(has(&r, "vmdk-subformat", "someunknownformat"));
}

/// `test_vmdk_format_checks`: signature, version, descriptor location.
#[test]
fn vmdk_header_checks() {
    let dir = tempdir();
    let zero = dir.path().join("zero");
    std::fs::write(&zero, [0u8; 512]).unwrap();
    let r = check(&zero, Some(Format::Vmdk));
    assert_verdict(&r, Verdict::Unsafe, "no signature");
    let p = qemu_create(dir.path(), "v.vmdk", "vmdk", "", "5M");
    patch(&p, 4, &0u32.to_le_bytes());
    assert!(has(&check(&p, None), "version", "version 0"));
    let p = qemu_create(dir.path(), "v.vmdk", "vmdk", "", "5M");
    patch(&p, 0x1c, &0u64.to_le_bytes());
    assert!(has(&check(&p, None), "vmdk-descriptor", "not at sector 1"));
}

/// A streamOptimized image whose grain directory is announced at the end, with the
/// footer marker, footer and end-of-stream marker built by `footer`.
fn footed(dir: &Path, footer: impl Fn(&mut [u8], &[u8])) -> PathBuf {
    let p = qemu_create(dir, "s.vmdk", "vmdk", "subformat=streamOptimized", "5M");
    let header = std::fs::read(&p).unwrap()[..512].to_vec();
    patch(&p, 56, &u64::MAX.to_le_bytes());
    let mut tail = vec![0u8; 1536];
    tail[12] = 3;
    tail[512..1024].copy_from_slice(&header);
    footer(&mut tail, &header);
    let len = std::fs::metadata(&p).unwrap().len();
    patch(&p, len, &tail);
    p
}

/// `test_vmdk_with_footer` and `test_vmdk_footer_checks`.
#[test]
fn vmdk_footer_rules() {
    let dir = tempdir();
    let d = dir.path();
    let good = footed(d, |_, _| {});
    assert_verdict(&check(&good, None), Verdict::Safe, "good footer");
    let zeroed = footed(d, |t, _| t.fill(0));
    assert_verdict(&check(&zeroed, None), Verdict::Unsafe, "zero footer");
    type Case = (&'static str, fn(&mut [u8]));
    let cases: [Case; 10] = [
        ("does not match", |t| t[512..516].copy_from_slice(b"leak")),
        ("does not match", |t| t[516] = 2),
        ("does not match", |t| t[512 + 36] = 2),
        ("does not match", |t| t[512 + 28] = 3),
        ("another footer", |t| t[512 + 56..512 + 64].fill(0xff)),
        ("footer marker", |t| t[12] = 7),
        ("footer marker", |t| t[8] = 1),
        ("footer marker", |t| t[16..512].fill(1)),
        ("end-of-stream", |t| t[1024 + 12] = 7),
        ("end-of-stream", |t| t[1024 + 16..].fill(1)),
    ];
    for (i, (want, edit)) in cases.iter().enumerate() {
        let p = footed(d, |t, _| edit(t));
        let r = check(&p, None);
        assert!(has(&r, "vmdk-footer", want), "case {i}: {:?}", r.findings);
    }
}

/// An image with an MBR whose partition entries `ptes` (boot, start CHS head, type,
/// start LBA) fill the first slots.
fn mbr(dir: &Path, ptes: &[(u8, u8, u8, u32)]) -> PathBuf {
    let mut b = vec![0u8; 512 * 10];
    b[510] = 0x55;
    b[511] = 0xaa;
    for (i, &(boot, head, kind, lba)) in ptes.iter().enumerate() {
        let e = 446 + 16 * i;
        b[e] = boot;
        b[e + 2] = head;
        b[e + 4] = kind;
        b[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
    }
    let p = dir.join("disk.raw");
    std::fs::write(&p, b).unwrap();
    p
}

/// `test_gpt_mbr_check`.
#[test]
fn mbr_and_gpt_partition_rules() {
    let dir = tempdir();
    let d = dir.path();
    let efi = (0, 2, 0xee, 1);
    let ok = |p: &[(u8, u8, u8, u32)]| {
        let r = check(&mbr(d, p), Some(Format::Raw));
        assert_verdict(&r, Verdict::Safe, &format!("{p:?}"));
    };
    let bad = |p: &[(u8, u8, u8, u32)], want: &str| {
        let r = check(&mbr(d, p), None);
        assert!(has(&r, "mbr", want), "{p:?}: {:?}", r.findings);
    };
    ok(&[efi]);
    bad(&[(0xa, 2, 0xee, 1)], "boot flag");
    bad(&[(0, 2, 0, 1)], "no partitions");
    bad(&[efi, efi], "other partitions");
    ok(&[(0, 1, 0x8e, 1), (0, 2, 2, 1)]);
    bad(&[(0, 1, 0xee, 1)], "start CHS");
    ok(&[(0, 2, 0x8e, 2)]);
    bad(&[(0, 2, 0xee, 2)], "start LBA");
    // A FAT boot sector is not an MBR.
    let p = mbr(d, &[(0xa, 2, 0, 1)]);
    patch(&p, 0x10, &[2]);
    patch(&p, 0x15, &[0xf8]);
    assert_verdict(&check(&p, None), Verdict::Safe, "FAT");
}

/// CVE-2022-47951: a VMDK descriptor naming a host file as its FLAT extent, as a text
/// file and hidden in a sparse header with zero capacity (qemu then opens the
/// descriptor's extents).
#[test]
fn cve_2022_47951_vmdk_flat_descriptor() {
    let dir = tempdir();
    let d = dir.path();
    let text = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                createType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/passwd\" 0\n";
    let p = d.join("x.vmdk");
    std::fs::write(&p, text).unwrap();
    for fmt in [None, Some(Format::Vmdk), Some(Format::Raw)] {
        let r = check(&p, fmt);
        assert_verdict(&r, Verdict::Unsafe, "flat descriptor");
        assert!(
            r.references.iter().any(|x| x.name == "/etc/passwd"),
            "{fmt:?}"
        );
    }
    let sparse = with_descriptor(d, &[text]);
    patch(&sparse, 12, &0u64.to_le_bytes());
    let r = check(&sparse, None);
    assert!(
        r.references
            .iter()
            .any(|x| x.kind == ReferenceKind::Extent && x.name == "/etc/passwd"),
        "{:?}",
        r.findings
    );
    // With a capacity, qemu ignores the embedded extent lines (but '/' is still refused).
    let r = check(&with_descriptor(d, &[text]), None);
    assert!(r.references.is_empty() && has(&r, "vmdk-descriptor", "'/'"));
}

/// CVE-2024-32498: qcow2 data files and backing files naming host files (also as
/// `json:` names), and VMDK extents.
#[test]
fn cve_2024_32498_qcow2_data_file_and_backing() {
    let dir = tempdir();
    let d = dir.path();
    let q = qemu_create(
        d,
        "q.qcow2",
        "qcow2",
        &format!("data_file={}", s(&d.join("x"))),
        "1M",
    );
    qemu_img_ok(&["amend", "-f", "qcow2", "-o", "data_file=/etc/passwd", s(&q)]);
    let r = check(&q, None);
    assert!(
        r.references
            .iter()
            .any(|x| x.kind == ReferenceKind::DataFile && x.name == "/etc/passwd")
    );
    assert_verdict(&r, Verdict::Unsafe, "data file");
    let json = r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}"#;
    let b = qemu_create(d, "b.qcow2", "qcow2", "", "1M");
    qemu_img_ok(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        json,
        "-F",
        "raw",
        s(&b),
    ]);
    let r = check(&b, None);
    assert!(
        r.references
            .iter()
            .any(|x| x.kind == ReferenceKind::BackingFile && x.name == json)
    );
    let v = d.join("f.vmdk");
    let o = "subformat=twoGbMaxExtentFlat";
    qemu_img_ok(&["create", "-q", "-f", "vmdk", "-o", o, s(&v), "1M"]);
    assert!(
        check(&v, None)
            .references
            .iter()
            .any(|x| x.kind == ReferenceKind::Extent)
    );
}

/// CVE-2024-40767: an image uploaded as raw that is a qcow2 with a backing file (or a
/// VMDK descriptor): the declared format does not match, and the hidden references
/// are listed.
#[test]
fn cve_2024_40767_format_not_pinned() {
    let dir = tempdir();
    let d = dir.path();
    let q = d.join("up.raw");
    qemu_create_overlay(s(&q), "qcow2", "/etc/passwd", "raw", Some("1M"));
    let r = check(&q, Some(Format::Raw));
    assert_verdict(&r, Verdict::Unsafe, "qcow2 as raw");
    assert!(has(&r, "format-mismatch", "content is qcow2"));
    assert!(r.references.iter().any(|x| x.name == "/etc/passwd"));
    let v = d.join("up2.raw");
    std::fs::write(
        &v,
        "version=1\ncreateType=\"vmfs\"\nRW 8 VMFS \"/etc/shadow\"\n",
    )
    .unwrap();
    let r = check(&v, Some(Format::Raw));
    assert!(has(&r, "format-mismatch", "content is vmdk"));
    assert!(r.references.iter().any(|x| x.name == "/etc/shadow"));
}

/// CVE-2026-24708: a guest writes a qcow2 header onto its raw disk; a later resize
/// without a format would treat it as qcow2. Declared raw it is unsafe; probed, the
/// reference it plants is named.
#[test]
fn cve_2026_24708_qcow2_header_written_by_a_guest() {
    let dir = tempdir();
    let d = dir.path();
    let disk = d.join("disk.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&disk), "16M"]);
    let evil = qemu_create(
        d,
        "e.qcow2",
        "qcow2",
        &format!("data_file={}", s(&d.join("x"))),
        "16M",
    );
    qemu_img_ok(&[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "data_file=/etc/shadow",
        s(&evil),
    ]);
    let header = std::fs::read(&evil).unwrap();
    patch(&disk, 0, &header[..65536]);
    let r = check(&disk, Some(Format::Raw));
    assert_verdict(&r, Verdict::Unsafe, "guest-written header");
    assert!(has(&r, "format-mismatch", "qcow2"));
    assert!(r.references.iter().any(|x| x.name == "/etc/shadow"));
    assert_verdict(&check(&disk, None), Verdict::Unsafe, "probed");
}

/// What format_inspector misses: VHD and VHDX parents, VMDK parents.
#[test]
fn differencing_images_name_their_parents() {
    let dir = tempdir();
    let d = dir.path();
    let any = ImageOptions::default().with_policy(OpenPolicy::qemu_compatible());
    for (fmt, ext) in [(Format::Vpc, "vhd"), (Format::Vhdx, "vhdx")] {
        let base = d.join(format!("base.{ext}"));
        create(&base, fmt, Some(4 << 20), OptionList::new(), &any).unwrap();
        let child = d.join(format!("child.{ext}"));
        let o = format!("backing_file=base.{ext},backing_fmt={}", fmt.name());
        create(&child, fmt, None, OptionList::parse(&o).unwrap(), &any).unwrap();
        let r = check(&child, None);
        assert_verdict(&r, Verdict::Unsafe, ext);
        let locs: Vec<_> = r
            .references
            .iter()
            .filter(|x| x.kind == ReferenceKind::ParentLocator)
            .collect();
        assert!(locs.len() >= 2, "{ext}: {locs:?}");
        assert!(locs.iter().any(|x| x.name.contains(&format!("base.{ext}"))));
        assert_verdict(&check(&base, None), Verdict::Safe, "base");
    }
    let base = qemu_create(d, "b.vmdk", "vmdk", "", "4M");
    let child = d.join("c.vmdk");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        s(&base),
        "-F",
        "vmdk",
        s(&child),
    ]);
    let r = check(&child, None);
    assert!(
        r.references
            .iter()
            .any(|x| x.kind == ReferenceKind::BackingFile)
    );
}
