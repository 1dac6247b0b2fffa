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
        qemu_img_ok(&["create", "-q", "-f", fmt.name(), p.to_str().unwrap(), "4M"]);
        let got = probe_path(&p).unwrap();
        // A driver that is not implemented yet cannot claim its files; once it is, the
        // probe must name it.
        let implemented = fmt
            .driver()
            .map(|d| {
                let s = diskimg_blockio::FileStorage::open(&p, true).unwrap();
                d.probe(&s) > 0
            })
            .unwrap_or(false);
        if implemented || fmt == Format::Raw {
            assert_eq!(got, fmt, "{fmt}");
        } else {
            assert_eq!(got, Format::Raw, "{fmt}");
        }
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
