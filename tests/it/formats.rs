//! Every format through the facade: create (with subformats), probe, open, write, and
//! qemu-img agreeing with the result; backing chains across formats.

use diskimg::{Format, ImageOptions, OpenPolicy, OptionList, create, open};
use diskimg_testutil::{pattern, qemu_compare, qemu_img, qemu_img_ok, read_all, tempdir};

/// (format, create options, whether qemu-img has a check for it)
const CASES: &[(Format, &str, bool)] = &[
    (Format::Raw, "", false),
    (Format::Vdi, "", true),
    (Format::Vdi, "static=on", true),
    (Format::Vpc, "", false),
    (Format::Vpc, "subformat=fixed", false),
    (Format::Vmdk, "", true),
    (Format::Vmdk, "subformat=monolithicFlat", true),
    (Format::Vmdk, "subformat=twoGbMaxExtentSparse", true),
    (Format::Vmdk, "subformat=twoGbMaxExtentFlat", true),
    (Format::Vmdk, "subformat=streamOptimized", true),
    (Format::Vhdx, "", true),
    (Format::Vhdx, "subformat=fixed,block_size=1M", true),
];

fn opts() -> ImageOptions {
    ImageOptions::default().with_policy(OpenPolicy::qemu_compatible())
}

#[test]
fn created_images_open_in_qemu_with_our_writes() {
    let dir = tempdir();
    for (i, (fmt, o, has_check)) in CASES.iter().enumerate() {
        let p = dir.path().join(format!("img{i}.{fmt}"));
        create(
            &p,
            *fmt,
            Some(8 << 20),
            OptionList::parse(o).unwrap(),
            &opts(),
        )
        .unwrap_or_else(|e| panic!("{fmt} {o}: {e}"));
        let img = open(&p, Some(*fmt), &opts()).unwrap();
        let data = pattern(i as u64, 3 << 20);
        img.device.write_at(&data, 1 << 20).unwrap();
        img.device.flush().unwrap();
        drop(img);
        // The expected content, as a raw file, compared by qemu.
        let expect = dir.path().join(format!("expect{i}.raw"));
        let mut raw = vec![0u8; 8 << 20];
        raw[1 << 20..4 << 20].copy_from_slice(&data);
        std::fs::write(&expect, &raw).unwrap();
        assert!(
            qemu_compare(&p, fmt.name(), &expect, "raw"),
            "{fmt} {o}: qemu reads different content"
        );
        if *has_check {
            let out = qemu_img(&["check", "-f", fmt.name(), p.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(0), "{fmt} {o}: {out:?}");
        }
        // Probing finds the format again (fixed VHD included, unlike qemu).
        let reopened = open(&p, None, &opts()).unwrap();
        assert_eq!(reopened.format, *fmt, "{o}");
        // vpc rounds the size up to its CHS geometry, as qemu does: the tail reads zero.
        let got = read_all(reopened.device.as_ref());
        assert!(got.len() >= raw.len(), "{fmt} {o}: size {}", got.len());
        assert!(got[..raw.len()] == raw[..], "{fmt} {o}: content differs");
        assert!(got[raw.len()..].iter().all(|&b| b == 0), "{fmt} {o}: tail");
    }
}

#[test]
fn multi_file_vmdk_extents_are_named_after_the_image() {
    let dir = tempdir();
    let p = dir.path().join("disk.vmdk");
    create(
        &p,
        Format::Vmdk,
        Some(1 << 20),
        OptionList::parse("subformat=monolithicFlat").unwrap(),
        &opts(),
    )
    .unwrap();
    assert!(dir.path().join("disk-flat.vmdk").exists());
    let info = qemu_img_ok(&["info", p.to_str().unwrap()]);
    assert!(info.contains("disk-flat.vmdk"), "{info}");
}

#[test]
fn backing_chains_of_qemu_made_images_read_through() {
    // base.vmdk <- top.vmdk (qemu-made delta), read through the facade.
    let dir = tempdir();
    let base = dir.path().join("base.vmdk");
    let top = dir.path().join("top.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "4M"]);
    diskimg_testutil::qemu_io(&base, "vmdk", &["write -P 0x11 0 2M"]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    diskimg_testutil::qemu_io(&top, "vmdk", &["write -P 0x22 1M 64k"]);
    let img = open(&top, None, &opts()).unwrap();
    assert_eq!(img.chain().len(), 2);
    let ours = read_all(img.device.as_ref());
    assert!(ours == diskimg_testutil::qemu_read_raw(&top, "vmdk"));
    // Done with it: closing releases the write lock the read-write open took.
    img.close().unwrap();
    drop(img);
    // The library default refuses to follow the chain.
    let err = open(&top, None, &ImageOptions::default()).unwrap_err();
    assert!(matches!(err, diskimg::Error::BackingDenied { .. }), "{err}");
    // Without the chain, the top alone reads its own data only.
    let lone = open(&top, None, &ImageOptions::default().with_backing(false)).unwrap();
    let mut b = [0u8; 1];
    lone.device.read_at(&mut b, 0).unwrap();
    assert_eq!(b[0], 0);
}

#[test]
fn vhd_differencing_created_through_the_facade() {
    let dir = tempdir();
    let base = dir.path().join("base.vhd");
    create(
        &base,
        Format::Vpc,
        Some(4 << 20),
        OptionList::new(),
        &opts(),
    )
    .unwrap();
    let b = open(&base, None, &opts()).unwrap();
    b.device.write_at(&[0x33; 65536], 0).unwrap();
    b.device.flush().unwrap();
    let size = b.device.virtual_size();
    drop(b);
    let child = dir.path().join("child.vhd");
    create(
        &child,
        Format::Vpc,
        None,
        OptionList::parse("backing_file=base.vhd,backing_fmt=vpc").unwrap(),
        &opts(),
    )
    .unwrap();
    let c = open(&child, None, &opts()).unwrap();
    assert_eq!(c.device.virtual_size(), size);
    assert_eq!(c.chain().len(), 2);
    c.device.write_at(&[0x44; 512], 512).unwrap();
    let mut buf = vec![0u8; 2048];
    c.device.read_at(&mut buf, 0).unwrap();
    assert!(buf[..512].iter().all(|&x| x == 0x33));
    assert!(buf[512..1024].iter().all(|&x| x == 0x44));
    assert!(buf[1024..].iter().all(|&x| x == 0x33));
}

#[test]
fn vhdx_differencing_created_through_the_facade() {
    let dir = tempdir();
    let base = dir.path().join("base.vhdx");
    create(
        &base,
        Format::Vhdx,
        Some(8 << 20),
        OptionList::new(),
        &opts(),
    )
    .unwrap();
    let b = open(&base, None, &opts()).unwrap();
    b.device.write_at(&pattern(9, 1 << 20), 0).unwrap();
    b.device.flush().unwrap();
    drop(b);
    let child = dir.path().join("child.vhdx");
    create(
        &child,
        Format::Vhdx,
        None,
        OptionList::parse("backing_file=base.vhdx,backing_fmt=vhdx").unwrap(),
        &opts(),
    )
    .unwrap();
    let c = open(&child, None, &opts()).unwrap();
    assert_eq!(c.chain().len(), 2);
    assert_eq!(c.device.virtual_size(), 8 << 20);
    c.device.write_at(&[0x55; 4096], 4096).unwrap();
    let got = read_all(c.device.as_ref());
    let mut expect = vec![0u8; 8 << 20];
    expect[..1 << 20].copy_from_slice(&pattern(9, 1 << 20));
    expect[4096..8192].fill(0x55);
    assert!(got == expect, "differencing VHDX content differs");
}
