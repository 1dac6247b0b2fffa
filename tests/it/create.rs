//! create(): option validation, sizes, backing rules.

use diskimg::{Format, ImageOptions, OptionList, create, open};
use diskimg_testutil::{qemu_info_json, tempdir};

#[test]
fn raw_create_matches_qemu_info() {
    let dir = tempdir();
    let p = dir.path().join("a.raw");
    create(
        &p,
        Format::Raw,
        None,
        OptionList::parse("size=3M,preallocation=off").unwrap(),
        &ImageOptions::default(),
    )
    .unwrap();
    let info = qemu_info_json(&p, "raw");
    assert_eq!(info["virtual-size"].as_u64(), Some(3 << 20));
    let img = open(&p, None, &ImageOptions::read_only(true)).unwrap();
    assert_eq!(img.device.virtual_size(), 3 << 20);
    assert!(img.backing.is_none());
}

#[test]
fn unknown_option_is_refused_by_name_and_nothing_is_left() {
    let dir = tempdir();
    let p = dir.path().join("b.raw");
    let err = create(
        &p,
        Format::Raw,
        Some(1 << 20),
        OptionList::parse("cluster_size=64k").unwrap(),
        &ImageOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("Invalid parameter 'cluster_size'"), "{err}");
    assert!(!p.exists());
}

#[test]
fn size_is_required_without_backing() {
    let dir = tempdir();
    let err = create(
        dir.path().join("c.raw"),
        Format::Raw,
        None,
        OptionList::new(),
        &ImageOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("Image creation needs a size parameter"),
        "{err}"
    );
}

#[test]
fn bad_preallocation_value_is_refused() {
    let dir = tempdir();
    let err = create(
        dir.path().join("d.raw"),
        Format::Raw,
        Some(4096),
        OptionList::parse("preallocation=sometimes").unwrap(),
        &ImageOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sometimes"), "{err}");
}
