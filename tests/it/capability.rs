//! The facade's maintenance functions over device capabilities (snapshots, bitmaps,
//! amend, chain links) and the chain-depth limit.

use diskimg::blockio::{BitmapOp, Secrets};
use diskimg::{Error, Format, ImageOptions, OpenPolicy, OptionList, create, maint, open};
use diskimg_testutil::{qemu_img_ok, qemu_info_json, tempdir};

fn make(path: &std::path::Path, format: Format, opts: &str) {
    let o = OptionList::parse(opts).unwrap();
    create(path, format, Some(1 << 20), o, &ImageOptions::default()).unwrap();
}

fn open_rw(path: &std::path::Path) -> diskimg::Image {
    let o = ImageOptions::default().with_policy(OpenPolicy::qemu_compatible());
    open(path, None, &o).unwrap()
}

#[test]
fn formats_without_a_capability_say_so() {
    let dir = tempdir();
    let p = dir.path().join("a.raw");
    make(&p, Format::Raw, "");
    let img = open_rw(&p);
    assert!(img.device.as_snapshots().is_none());
    assert!(img.device.as_bitmaps().is_none());
    assert!(img.device.as_amend().is_none());
    assert!(img.device.as_chain_link().is_none());
    let e = maint::create_snapshot(&img, "s").unwrap_err();
    assert!(e.is_unsupported(), "{e}");
    let e = maint::make_empty(&img).unwrap_err();
    assert!(e.is_unsupported(), "{e}");
    let e = maint::amend(
        &img,
        &OptionList::parse("size=2M").unwrap(),
        &Secrets::new(),
    );
    let e = e.unwrap_err();
    assert!(e.is_unsupported(), "{e:?}");
    assert!(
        matches!(&e, diskimg::Error::Unsupported { what, .. }
            if what == "Format driver 'raw' does not support option amendment"),
        "{e:?}"
    );
    // Relinking is a no-op where the format keeps no link.
    maint::relink_after_commit(img.device.as_ref(), img.device.as_ref()).unwrap();
    assert!(maint::bitmaps_of(img.device.as_ref()).is_empty());
}

#[test]
fn qcow2_snapshots_amend_and_backing_link_through_the_facade() {
    let dir = tempdir();
    let p = dir.path().join("a.qcow2");
    make(&p, Format::Qcow2, "");
    let img = open_rw(&p);
    img.device.write_at(&[7; 512], 0).unwrap();
    let id = maint::create_snapshot(&img, "first").unwrap();
    img.device.write_at(&[9; 512], 0).unwrap();
    let view = img.device.as_snapshots().unwrap().open(&id).unwrap();
    let mut buf = [0u8; 512];
    view.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7; 512]);
    maint::apply_snapshot(&img, "first").unwrap();
    img.device.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7; 512]);
    maint::delete_snapshot(&img, &id).unwrap();
    assert!(img.device.info().snapshots.is_empty());

    let am = maint::amender(&img).unwrap();
    let bad = OptionList::parse("cluster_size=4k").unwrap();
    assert!(am.check_options(&bad).is_err());
    let opts = OptionList::parse("lazy_refcounts=on,size=2M").unwrap();
    am.check_options(&opts).unwrap();
    maint::amend(&img, &opts, &Secrets::new()).unwrap();
    maint::set_backing_file(&img, Some("base.raw"), Some("raw")).unwrap();
    img.close().unwrap();
    drop(img);
    let info = qemu_info_json(&p, "qcow2");
    assert_eq!(info["virtual-size"].as_u64(), Some(2 << 20));
    assert_eq!(info["backing-filename"].as_str(), Some("base.raw"));
    assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], true);
    assert!(info.get("snapshots").is_none());
}

#[test]
fn copy_bitmap_recreates_name_state_and_bits() {
    let dir = tempdir();
    let (src, dst) = (dir.path().join("s.qcow2"), dir.path().join("d.qcow2"));
    make(&src, Format::Qcow2, "");
    make(&dst, Format::Qcow2, "");
    let add = |enabled| BitmapOp::Add {
        granularity: Some(65536),
        enabled,
    };
    maint::edit_bitmaps(&src, None, "on", &[add(true)]).unwrap();
    maint::edit_bitmaps(&src, None, "off", &[add(false)]).unwrap();
    {
        // A write while "on" tracks it.
        let img = open_rw(&src);
        img.device.write_at(&[1; 4096], 3 << 16).unwrap();
        img.close().unwrap();
    }
    let img = open(&src, None, &ImageOptions::read_only(true)).unwrap();
    let list = maint::bitmaps_of(img.device.as_ref());
    assert_eq!(list.len(), 2);
    for b in &list {
        maint::copy_bitmap(img.device.as_ref(), b, &dst, Format::Qcow2).unwrap();
    }
    let copied = open(&dst, None, &ImageOptions::read_only(true)).unwrap();
    assert_eq!(maint::bitmaps_of(copied.device.as_ref()), list);
    let bits = |d: &diskimg::Image, n: &str| d.device.as_bitmaps().unwrap().read(n).unwrap();
    assert_eq!(bits(&copied, "on"), bits(&img, "on"));
    assert_eq!(bits(&copied, "on").bits.first(), Some(&0b1000));
    qemu_img_ok(&["check", "-f", "qcow2", dst.to_str().unwrap()]);
}

#[test]
fn chain_depth_error_reports_the_limit_that_was_applied() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    make(&base, Format::Raw, "");
    let mut below = base.clone();
    for i in 0..3 {
        let p = dir.path().join(format!("o{i}.qcow2"));
        let b = below.file_name().unwrap().to_str().unwrap();
        let fmt = if i == 0 { "raw" } else { "qcow2" };
        make(
            &p,
            Format::Qcow2,
            &format!("backing_file={b},backing_fmt={fmt}"),
        );
        below = p;
    }
    let mut o = ImageOptions::default().with_policy(OpenPolicy::qemu_compatible());
    o.limits.max_chain_depth = 1;
    match open(&below, None, &o).unwrap_err() {
        Error::LimitExceeded { limit, .. } => assert_eq!(limit, 1),
        e => panic!("unexpected {e}"),
    }
    o.limits.max_chain_depth = 64;
    assert_eq!(open(&below, None, &o).unwrap().chain().len(), 4);
}
