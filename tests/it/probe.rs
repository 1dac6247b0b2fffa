//! Probing: raw is the fallback and never a probe hit; qemu-made images probe right.

use diskimg::{Format, ImageOptions, open, probe, probe_path};
use diskimg_blockio::MemStorage;
use diskimg_testutil::{corpus_file, qemu_img_ok, tempdir};

#[test]
fn unknown_bytes_are_raw() {
    for bytes in [vec![], vec![0u8; 512], b"QFI".to_vec(), vec![0xff; 4096]] {
        assert_eq!(probe(&MemStorage::from_vec(bytes)), Format::Raw);
    }
}

#[test]
fn corpus_files_of_other_formats_are_not_misprobed_as_ours() {
    // bochs, cloop, dmg, parallels are formats we do not implement: they must probe as
    // raw (the fallback), never as one of ours.
    let dir = tempdir();
    for name in [
        "empty.bochs",
        "simple-pattern.cloop",
        "simple-dmg.dmg",
        "parallels-v1",
        "grub_mbr.raw",
    ] {
        let p = corpus_file(name, dir.path());
        assert_eq!(probe_path(&p).unwrap(), Format::Raw, "{name}");
    }
}

#[test]
fn qemu_made_images_probe_as_their_format() {
    let dir = tempdir();
    for fmt in Format::ALL {
        let p = dir.path().join(format!("img.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt.name()];
        if fmt == Format::Luks {
            args.extend([
                "--object",
                "secret,id=s0,data=pw",
                "-o",
                "key-secret=s0,iter-time=10",
            ]);
        }
        args.extend([p.to_str().unwrap(), "4M"]);
        qemu_img_ok(&args);
        assert_eq!(probe_path(&p).unwrap(), fmt, "{fmt}");
    }
}

#[test]
fn format_names_round_trip() {
    for f in Format::ALL {
        assert_eq!(Format::from_name(f.name()).unwrap(), f);
    }
    assert_eq!(Format::from_name("vhd").unwrap(), Format::Vpc);
    let err = Format::from_name("qed").unwrap_err().to_string();
    assert!(err.contains("Unknown file format 'qed'"), "{err}");
}

#[test]
fn open_reports_missing_files_by_name() {
    let dir = tempdir();
    let p = dir.path().join("nope.img");
    let err = open(&p, None, &ImageOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.img"), "{err}");
}

#[test]
fn corpus_samples_of_our_formats_probe_right() {
    let dir = tempdir();
    for (name, fmt) in [
        ("virtualpc-dynamic.vhd", Format::Vpc),
        ("hyperv2012r2-dynamic.vhd", Format::Vpc),
        ("iotest-dirtylog-10G-4M.vhdx", Format::Vhdx),
        ("iotest-version3.vmdk", Format::Vmdk),
    ] {
        let p = corpus_file(name, dir.path());
        assert_eq!(probe_path(&p).unwrap(), fmt, "{name}");
    }
}

#[test]
fn fixed_vhd_probes_as_vpc_unlike_qemu() {
    let dir = tempdir();
    let p = dir.path().join("fixed.vhd");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        p.to_str().unwrap(),
        "4M",
    ]);
    assert_eq!(probe_path(&p).unwrap(), Format::Vpc);
    // qemu itself probes it as raw (documented difference).
    let info = diskimg_testutil::qemu_img_ok(&["info", "--output=json", p.to_str().unwrap()]);
    assert!(info.contains("\"format\": \"raw\""), "{info}");
}
