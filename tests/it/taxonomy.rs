//! The error taxonomy on real images: damaged bytes give [`Error::Corrupt`] with the
//! offset of the damaged field, a foreign file gives [`Error::NotThisFormat`], and a bad
//! request gives [`Error::InvalidArgument`] — for every format outside qcow2 (whose
//! own tests cover it); a backing loop and a capability a format lacks have their own
//! variants.

use std::sync::Arc;

use diskimg::blockio::MemStorage;
use diskimg::{Error, Format, ImageOptions, OptionList, open_storage};
use diskimg_testutil::{qemu_img_ok, tempdir};

/// The bytes of a 4 MiB image qemu-img made in `fmt` with `-o opts`.
fn qemu_image(fmt: Format, opts: &str) -> Vec<u8> {
    let dir = tempdir();
    let p = dir.path().join("img");
    let mut args = vec!["create", "-q", "-f", fmt.name()];
    if fmt == Format::Luks {
        args.extend(["--object", "secret,id=s0,data=pw"]);
    }
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p.to_str().unwrap(), "4M"]);
    qemu_img_ok(&args);
    std::fs::read(&p).unwrap()
}

fn open_err(fmt: Format, bytes: Vec<u8>) -> Error {
    let s = Arc::new(MemStorage::from_vec(bytes));
    match open_storage(s, Some(fmt), true) {
        Ok(_) => panic!("{fmt}: the damaged image opened"),
        Err(e) => e,
    }
}

fn assert_corrupt(fmt: Format, e: &Error, want: u64) {
    assert!(
        matches!(e, Error::Corrupt { offset: Some(o), .. } if *o == want),
        "{fmt}: want Corrupt at {want:#x}, got {e:?}"
    );
}

fn assert_foreign(fmt: Format, e: &Error, want: u64) {
    assert!(
        matches!(e, Error::NotThisFormat { offset, .. } if *offset == want),
        "{fmt}: want NotThisFormat at {want:#x}, got {e:?}"
    );
}

#[test]
fn vdi_damage_is_corrupt_and_a_wrong_signature_is_foreign() {
    let img = qemu_image(Format::Vdi, "");
    // The block map starts at 512 (offset_bmap) and no longer fits in the file.
    assert_corrupt(
        Format::Vdi,
        &open_err(Format::Vdi, img[..512].to_vec()),
        512,
    );
    let mut v = img.clone();
    v[64..68].fill(0);
    assert_foreign(Format::Vdi, &open_err(Format::Vdi, v), 64);
}

#[test]
fn vpc_damage_is_corrupt_and_a_missing_cookie_is_foreign() {
    let img = qemu_image(Format::Vpc, "");
    // A changed creator application breaks the footer checksum (field at byte 64).
    let mut v = img.clone();
    v[28] ^= 1;
    assert_corrupt(Format::Vpc, &open_err(Format::Vpc, v), 64);
    // Without the cookie at 0 the copy at the end is tried: a dynamic disk's is refused.
    let mut v = img.clone();
    v[..8].fill(0);
    let at = v.len() as u64 - 512;
    assert_foreign(Format::Vpc, &open_err(Format::Vpc, v), at);
}

#[test]
fn vhdx_damage_is_corrupt_and_a_missing_signature_is_foreign() {
    let img = qemu_image(Format::Vhdx, "");
    let mut v = img.clone();
    v[64 << 10] ^= 1;
    v[128 << 10] ^= 1;
    let e = open_err(Format::Vhdx, v);
    assert!(
        matches!(
            e,
            Error::Corrupt {
                offset: Some(_),
                ..
            }
        ),
        "{e:?}"
    );
    let mut v = img.clone();
    v[..8].fill(0);
    assert_foreign(Format::Vhdx, &open_err(Format::Vhdx, v), 0);
}

#[test]
fn vmdk_damage_is_corrupt_and_text_without_a_descriptor_is_foreign() {
    let img = qemu_image(Format::Vmdk, "");
    // numGTEsPerGT (byte 44) over qemu's limit of 512.
    let mut v = img.clone();
    v[44..48].copy_from_slice(&1024u32.to_le_bytes());
    assert_corrupt(Format::Vmdk, &open_err(Format::Vmdk, v), 44);
    let v = b"just some text, not a descriptor\n".repeat(32);
    assert_foreign(Format::Vmdk, &open_err(Format::Vmdk, v), 0);
}

#[test]
fn luks_damage_is_corrupt_and_a_missing_magic_is_foreign() {
    let img = qemu_image(Format::Luks, "key-secret=s0,iter-time=10");
    // key_bytes (byte 108) of 7 is no AES key size.
    let mut v = img.clone();
    v[108..112].copy_from_slice(&7u32.to_be_bytes());
    assert_corrupt(Format::Luks, &open_err(Format::Luks, v), 108);
    let mut v = img.clone();
    v[..6].fill(0);
    assert_foreign(Format::Luks, &open_err(Format::Luks, v), 0);
}

#[test]
fn bad_create_options_are_invalid_arguments() {
    let dir = tempdir();
    for (fmt, opts) in [
        (Format::Raw, "preallocation=metadata"),
        (Format::Vdi, "preallocation=metadata"),
        (Format::Vpc, "preallocation=metadata"),
        (Format::Vmdk, "preallocation=metadata"),
        (Format::Vhdx, "block_size=3M"),
    ] {
        let p = dir.path().join(format!("bad.{fmt}"));
        let o = OptionList::parse(opts).unwrap();
        let e = diskimg::create(&p, fmt, Some(4 << 20), o, &ImageOptions::default()).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(_)),
            "{fmt} {opts}: {e:?}"
        );
    }
}

#[test]
fn a_corrupt_image_is_reported_with_its_offset() {
    let e = diskimg::blockio::Error::corrupt("vdi", "header truncated", 0x40);
    assert!(e.is_bad_image());
    assert_eq!(e.image_offset(), Some(0x40));
    assert_eq!(e.to_string(), "header truncated");
    assert!(e.located().contains("0x40"), "{}", e.located());
}

#[test]
fn a_backing_loop_and_a_missing_capability_have_their_own_variants() {
    let dir = tempdir();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    qemu_img_ok(&["create", "-q", "-f", "qcow2", a_s, "1M"]);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", a_s, "-F", "qcow2", b_s]);
    qemu_img_ok(&["rebase", "-u", "-f", "qcow2", "-b", b_s, "-F", "qcow2", a_s]);
    let opts = ImageOptions::default().with_policy(diskimg::OpenPolicy::qemu_compatible());
    let e = diskimg::open(&b, None, &opts).unwrap_err();
    assert!(matches!(e, Error::BackingLoop { .. }), "{e:?}");
    assert!(e.to_string().ends_with("creates an infinite loop."), "{e}");
    // Measuring for a format that cannot: qemu's words, as Unsupported.
    let none = OptionList::parse("").unwrap();
    let e = diskimg::maint::measure(None, 1 << 20, Format::Vdi, &none).unwrap_err();
    assert!(e.is_unsupported(), "{e:?}");
    assert!(
        matches!(&e, Error::Unsupported { what, .. }
            if what == "Block driver 'vdi' does not support size measurement"),
        "{e:?}"
    );
}
