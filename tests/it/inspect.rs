//! `diskimg::inspect` against OpenStack format_inspector's own test suite
//! (oslo.utils `tests/imageutils/test_format_inspector.py`), each case rebuilt with
//! qemu-img-made images, and against every image qemu-img creates without host-file
//! references (none may be called unsafe).

use std::path::{Path, PathBuf};

use diskimg::{Format, InspectOptions, Report, Verdict, inspect};
use diskimg_testutil::{qemu_create_overlay, qemu_img_ok, qemu_info_json, qemu_io, tempdir};

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Inspects `p` as `fmt` (probed when `None`).
pub(crate) fn check(p: &Path, fmt: Option<Format>) -> Report {
    inspect(p, &InspectOptions::default().with_format(fmt)).unwrap()
}

/// True when a finding of `check` exists whose message contains `text`.
pub(crate) fn has(r: &Report, check: &str, text: &str) -> bool {
    r.findings
        .iter()
        .any(|f| f.check == check && f.message.contains(text))
}

/// Asserts the verdict, printing the findings when it differs.
pub(crate) fn assert_verdict(r: &Report, want: Verdict, what: &str) {
    assert_eq!(r.verdict, want, "{what}: {:#?}", r.findings);
}

/// `qemu-img create -f FMT [-o OPTS] PATH SIZE` in `dir`.
pub(crate) fn qemu_create(dir: &Path, name: &str, fmt: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&p), size]);
    qemu_img_ok(&args);
    p
}

/// Overwrites bytes of `p` at `off`.
pub(crate) fn patch(p: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// format_inspector's `test_format` / `test_subformat` / `test_vdi`: every format at
/// 128, 129 and 7 MiB is detected, sized as qemu says, and safe.
#[test]
fn formats_and_sizes_match_qemu() {
    let dir = tempdir();
    let cases = [
        ("qcow2", ""),
        ("vpc", ""),
        ("vhdx", ""),
        ("vmdk", ""),
        ("vmdk", "subformat=streamOptimized"),
        ("vdi", ""),
    ];
    for (fmt, opts) in cases {
        for mib in [128, 129, 7] {
            let p = qemu_create(
                dir.path(),
                &format!("i.{fmt}"),
                fmt,
                opts,
                &format!("{mib}M"),
            );
            let r = check(&p, None);
            assert_verdict(&r, Verdict::Safe, &format!("{fmt} {opts} {mib}M"));
            assert_eq!(r.format, fmt);
            let q = qemu_info_json(&p, fmt)["virtual-size"].as_u64().unwrap();
            assert_eq!(r.virtual_size, Some(q), "{fmt} {mib}M");
        }
    }
}

/// A minimal ISO 9660 (or UDF) volume: a primary volume descriptor at 32 KiB and a
/// terminator, `blocks` logical blocks long.
pub(crate) fn iso(dir: &Path, name: &str, udf: bool) -> PathBuf {
    let blocks = 64u32;
    let mut b = vec![0u8; blocks as usize * 2048];
    let pvd = &mut b[0x8000..0x8800];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[80..84].copy_from_slice(&blocks.to_le_bytes());
    pvd[84..88].copy_from_slice(&blocks.to_be_bytes());
    pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
    let term = &mut b[0x8800..0x9000];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    if udf {
        b[0x9001..0x9006].copy_from_slice(b"BEA01");
        b[0x9801..0x9806].copy_from_slice(b"NSR02");
    }
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn iso_and_udf_are_raw_content_and_safe() {
    let dir = tempdir();
    for udf in [false, true] {
        let p = iso(dir.path(), "x.iso", udf);
        let r = check(&p, None);
        assert_verdict(&r, Verdict::Safe, "iso");
        assert_eq!(r.format, "raw");
        assert!(r.signatures.iter().any(|s| s.name == "iso9660"));
        assert_eq!(r.signatures.iter().any(|s| s.name == "udf"), udf);
        assert_verdict(&check(&p, Some(Format::Raw)), Verdict::Safe, "iso as raw");
    }
}

/// `test_bad_iso_qcow2` and `test_bad_iso_qcow2_multiple_matches`: the first 32 KiB of
/// a qcow2 image in the system area of an ISO.
#[test]
fn qcow2_header_in_an_iso_system_area() {
    let dir = tempdir();
    let q = qemu_create(dir.path(), "q.qcow2", "qcow2", "", "5M");
    let p = iso(dir.path(), "bad.iso", false);
    let head = std::fs::read(&q).unwrap();
    patch(&p, 0, &head[..32768]);
    for fmt in [None, Some(Format::Raw), Some(Format::Qcow2)] {
        let r = check(&p, fmt);
        assert_verdict(&r, Verdict::Unsafe, "bad iso");
        assert!(
            has(&r, "multiple-formats", "qcow2 at 0"),
            "{:?}",
            r.findings
        );
        assert!(has(&r, "multiple-formats", "iso9660 at 32768"));
    }
}

#[test]
fn qed_is_always_unsafe() {
    let dir = tempdir();
    let p = qemu_create(dir.path(), "q.qed", "qed", "", "5M");
    let r = check(&p, None);
    assert_eq!(r.format, "qed");
    assert_verdict(&r, Verdict::Unsafe, "qed");
    assert!(has(&r, "banned-format", "qed"));
}

/// `test_vmdk_non_sparse_unsafe`, and every other multi-file subformat.
#[test]
fn vmdk_subformats_with_extent_files_are_unsafe() {
    let dir = tempdir();
    for sub in [
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let p = qemu_create(
            dir.path(),
            "v.vmdk",
            "vmdk",
            &format!("subformat={sub}"),
            "5M",
        );
        let r = check(&p, None);
        assert_eq!(r.format, "vmdk");
        assert_verdict(&r, Verdict::Unsafe, sub);
        assert!(has(&r, "vmdk-subformat", sub), "{sub}: {:?}", r.findings);
        assert!(!r.references.is_empty() && has(&r, "extent", "v-"), "{sub}");
    }
}

/// `test_vmdk_bad_descriptor_offset` (monolithicSparse and streamOptimized).
#[test]
fn vmdk_descriptor_elsewhere_is_unsafe() {
    let dir = tempdir();
    for sub in ["monolithicSparse", "streamOptimized"] {
        let p = qemu_create(
            dir.path(),
            "v.vmdk",
            "vmdk",
            &format!("subformat={sub}"),
            "5M",
        );
        patch(&p, 0x1c, &(0x400u64 / 512).to_le_bytes());
        let r = check(&p, None);
        assert_verdict(&r, Verdict::Unsafe, sub);
        assert!(
            has(&r, "vmdk-descriptor", "not at sector 1"),
            "{:?}",
            r.findings
        );
    }
}

/// `test_vmdk_bad_descriptor_mem_limit`: a descriptor size of 2 MiB is read capped (the
/// size and format still come out right, with bounded memory).
#[test]
fn vmdk_huge_descriptor_size_is_capped() {
    let dir = tempdir();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, diskimg_testutil::pattern(7, 5 << 20)).unwrap();
    for sub in ["monolithicSparse", "streamOptimized"] {
        let p = dir.path().join("v.vmdk");
        let o = format!("subformat={sub}");
        qemu_img_ok(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &o,
            "-S",
            "0",
            s(&raw),
            s(&p),
        ]);
        patch(&p, 0x24, &((2u64 << 20) / 512).to_le_bytes());
        let r = check(&p, None);
        assert_eq!(r.format, "vmdk");
        assert_eq!(r.virtual_size, Some(5 << 20));
    }
}

/// `test_qcow2_safety_checks`.
#[test]
fn qcow2_backing_and_data_files_are_unsafe() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("backing"), b"foobar").unwrap();
    let plain = qemu_create(d, "p.qcow2", "qcow2", "", "5M");
    assert_verdict(&check(&plain, None), Verdict::Safe, "plain");
    let back = d.join("b.qcow2");
    let bs = s(&d.join("backing")).to_string();
    qemu_create_overlay(s(&back), "qcow2", &bs, "raw", Some("5M"));
    let r = check(&back, None);
    assert_verdict(&r, Verdict::Unsafe, "backing");
    assert!(has(&r, "backing-file", &bs) && has(&r, "backing-file", "format raw"));
    let data = format!("data_file={},data_file_raw=on", s(&d.join("data")));
    let df = qemu_create(d, "d.qcow2", "qcow2", &data, "5M");
    let r = check(&df, None);
    assert_verdict(&r, Verdict::Unsafe, "data file");
    assert!(has(&r, "data-file", s(&d.join("data"))));
    // A file that is not qcow2 inspected as qcow2.
    let r = check(&d.join("backing"), Some(Format::Qcow2));
    assert_verdict(&r, Verdict::Unsafe, "not qcow2");
    assert!(has(&r, "format-mismatch", "declared as qcow2"));
}

/// `test_qcow2_feature_flag_checks` on a qemu-made v3 (and v2) image.
#[test]
fn qcow2_feature_bits_and_versions() {
    let dir = tempdir();
    let fresh = |v2: bool| {
        let o = if v2 { "compat=0.10" } else { "" };
        qemu_create(dir.path(), "f.qcow2", "qcow2", o, "5M")
    };
    let p = fresh(false);
    assert_verdict(&check(&p, None), Verdict::Safe, "v3");
    patch(&p, 0x48, &[1]);
    let r = check(&p, None);
    assert_verdict(&r, Verdict::Unsafe, "bit 56");
    assert!(
        r.unknown_features.iter().any(|f| f.contains("bit 56")),
        "{r:?}"
    );
    let p = fresh(false);
    patch(&p, 0x4f, &[1]);
    assert_verdict(&check(&p, None), Verdict::Safe, "dirty bit");
    patch(&p, 0x4f, &[0x80]);
    assert_verdict(&check(&p, None), Verdict::Unsafe, "bit 7");
    for v in [1u32, 4] {
        let p = fresh(false);
        patch(&p, 4, &v.to_be_bytes());
        let r = check(&p, None);
        assert_verdict(&r, Verdict::Unsafe, &format!("version {v}"));
    }
    // Version 2 has no feature bits: the same bytes are not read as features.
    let p = fresh(true);
    patch(&p, 0x4f, &[0x80]);
    assert_verdict(&check(&p, None), Verdict::Safe, "v2");
    // Extended L2 (bit 4) is known: format_inspector's table stops at bit 3.
    let p = qemu_create(dir.path(), "e.qcow2", "qcow2", "extended_l2=on", "5M");
    assert_verdict(&check(&p, None), Verdict::Safe, "extended L2");
}

/// `test_invalid_data`: text is raw and safe.
#[test]
fn text_is_raw() {
    let dir = tempdir();
    let p = dir.path().join("t.txt");
    std::fs::write(&p, "Lorem ipsum dolor sit amet\n".repeat(400)).unwrap();
    let r = check(&p, None);
    assert_eq!(r.format, "raw");
    assert!(r.signatures.is_empty());
    assert_verdict(&r, Verdict::Safe, "text");
}

#[test]
fn every_image_qemu_img_makes_without_references_is_safe() {
    let dir = tempdir();
    let d = dir.path();
    let cases: &[(&str, &str, &str)] = &[
        ("qcow2", "compat=0.10", "64M"),
        ("qcow2", "cluster_size=2M", "1T"),
        ("qcow2", "cluster_size=512", "64M"),
        ("qcow2", "compression_type=zstd", "64M"),
        ("qcow2", "lazy_refcounts=on", "64M"),
        ("qcow2", "refcount_bits=1", "64M"),
        ("qcow2", "refcount_bits=64", "64M"),
        ("qcow2", "preallocation=metadata", "64M"),
        ("qcow2", "preallocation=full", "8M"),
        ("vmdk", "zeroed_grain=on", "64M"),
        ("vmdk", "compat6=on", "64M"),
        ("vmdk", "adapter_type=lsilogic", "64M"),
        ("vpc", "subformat=fixed", "16M"),
        ("vpc", "force_size=on", "64M"),
        ("vhdx", "subformat=fixed", "16M"),
        ("vhdx", "block_size=1M", "64M"),
        ("vhdx", "log_size=2M", "64M"),
        ("vdi", "static=on", "16M"),
        ("raw", "", "16M"),
    ];
    for (fmt, opts, size) in cases {
        let p = qemu_create(d, &format!("i.{fmt}"), fmt, opts, size);
        if *fmt != "raw" {
            qemu_io(&p, fmt, &["write -P 0x5a 0 3M", "write -P 0x11 7M 64k"]);
        }
        let r = check(&p, Some(Format::from_name(fmt).unwrap()));
        assert_verdict(&r, Verdict::Safe, &format!("{fmt} {opts}"));
    }
    // Converted (allocated, compressed) images, snapshots and bitmaps.
    let raw = d.join("r.raw");
    std::fs::write(&raw, diskimg_testutil::pattern(3, 6 << 20)).unwrap();
    let conv: &[(&str, &[&str])] = &[
        ("qcow2", &["-c"]),
        ("qcow2", &["-c", "-o", "compression_type=zstd"]),
        ("vmdk", &["-o", "subformat=streamOptimized"]),
        ("vmdk", &[]),
        ("vdi", &[]),
        ("vhdx", &[]),
        ("vpc", &[]),
    ];
    for (fmt, extra) in conv {
        let out = d.join(format!("c.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        args.extend_from_slice(extra);
        args.extend([s(&raw), s(&out)]);
        qemu_img_ok(&args);
        assert_verdict(
            &check(&out, None),
            Verdict::Safe,
            &format!("convert {fmt} {extra:?}"),
        );
    }
    let snap = qemu_create(d, "s.qcow2", "qcow2", "", "16M");
    qemu_io(&snap, "qcow2", &["write -P 1 0 1M"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&snap)]);
    qemu_io(&snap, "qcow2", &["write -P 2 0 2M"]);
    qemu_img_ok(&["bitmap", "--add", s(&snap), "b0"]);
    assert_verdict(&check(&snap, None), Verdict::Safe, "snapshot + bitmap");
}

#[test]
fn encrypted_images_are_noted_not_unsafe() {
    let dir = tempdir();
    let d = dir.path();
    let obj = "secret,id=s0,data=pw";
    let q = d.join("e.qcow2");
    let o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        obj,
        "-o",
        o,
        s(&q),
        "16M",
    ]);
    let r = check(&q, None);
    assert_verdict(&r, Verdict::Safe, "qcow2 luks");
    assert_eq!(r.encryption, ["qcow2 luks"]);
    let l = d.join("e.luks");
    let o = "key-secret=s0,iter-time=10";
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        obj,
        "-o",
        o,
        s(&l),
        "16M",
    ]);
    let r = check(&l, None);
    assert_eq!(r.format, "luks");
    assert_verdict(&r, Verdict::Safe, "luks");
    assert_eq!(r.encryption, ["luks"]);
    // LUKS version 2 is refused as format_inspector does; as raw, LUKS is a mismatch.
    patch(&l, 6, &2u16.to_be_bytes());
    assert!(has(&check(&l, None), "luks", "version 2"));
    assert_verdict(
        &check(&l, Some(Format::Raw)),
        Verdict::Unsafe,
        "luks as raw",
    );
}
