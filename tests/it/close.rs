//! `close()` means the same for every format (issue 17): writes, zeroes, discards,
//! resizes, copies and repairs fail with `Error::Closed` afterwards, reads and flushes
//! still work, a second close does nothing; the files' locks go with the close, and with
//! the drop of an image that was never closed (whose data is then in a clean image).
//! qemu-io judges the locks and the data, qemu-img check the image.

use std::path::Path;
use std::process::Command;

use diskimg::{Format, ImageOptions, OptionList, create, open};
use diskimg_blockio::{Error, MemStorage, Preallocation, RepairMode, ZeroFlags};

const FORMATS: [Format; 6] = [
    Format::Raw,
    Format::Qcow2,
    Format::Vdi,
    Format::Vpc,
    Format::Vmdk,
    Format::Vhdx,
];

/// `qemu-io -f FMT -c CMD FILE`: its exit status and stderr.
fn qemu_io(p: &Path, fmt: Format, cmd: &str) -> (bool, String) {
    let o = Command::new("qemu-io")
        .args(["-f", fmt.name(), "-c", cmd])
        .arg(p)
        .output()
        .expect("run qemu-io (install qemu-utils)");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn fresh(dir: &Path, fmt: Format, tag: &str) -> std::path::PathBuf {
    let p = dir.join(format!("{tag}.{}", fmt.name()));
    let opts = ImageOptions::default();
    create(&p, fmt, Some(4 << 20), OptionList::new(), &opts).unwrap();
    p
}

#[test]
fn close_is_uniform_across_formats() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in FORMATS {
        let p = fresh(dir.path(), fmt, "c");
        let img = open(&p, Some(fmt), &ImageOptions::default()).unwrap();
        let dev = img.device.clone();
        dev.write_at(&[0x5a; 512], 0).unwrap();
        // Held: a second writer, ours or qemu's, is refused.
        let e = open(&p, Some(fmt), &ImageOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{fmt:?}: {e}");
        let (ok, err) = qemu_io(&p, fmt, "write 0 512");
        assert!(!ok && err.contains("\"write\" lock"), "{fmt:?}: {err}");
        img.close().unwrap();
        let closed = |r: diskimg::Result<()>, what: &str| {
            assert!(matches!(r, Err(Error::Closed)), "{fmt:?} {what}: {r:?}");
        };
        closed(dev.write_at(&[1; 512], 512), "write");
        closed(
            dev.write_zeroes(0, 512, ZeroFlags::default()),
            "write_zeroes",
        );
        closed(dev.discard(0, 512), "discard");
        closed(dev.resize(8 << 20, Preallocation::Off, false), "resize");
        let src = MemStorage::from_vec(vec![3u8; 512]);
        closed(dev.write_from(0, 512, &src, 0), "write_from");
        let repair = dev.check(RepairMode::All).map(drop);
        match fmt {
            // Formats qemu cannot repair refuse it before anything else.
            Format::Raw | Format::Vdi | Format::Vmdk => {
                assert!(matches!(repair, Err(Error::Unsupported { .. })), "{fmt:?}")
            }
            _ => closed(repair, "check -r all"),
        }
        // Nothing is left to write: a flush and a second close succeed.
        dev.flush().unwrap();
        img.close().unwrap();
        dev.close().unwrap();
        let mut buf = [0u8; 512];
        dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0x5a; 512], "{fmt:?}: reads after close");
        // The close released the locks while the handles live: qemu writes now.
        let (ok, err) = qemu_io(&p, fmt, "write -P 0x66 4096 512");
        assert!(ok, "{fmt:?} after close: {err}");
        drop((img, dev));
        // What was written before the close is in the file, next to qemu's write.
        let (ok, err) = qemu_io(&p, fmt, "read -P 0x5a 0 512");
        assert!(ok && err.is_empty(), "{fmt:?}: {err}");
    }
}

#[test]
fn dropping_an_unclosed_image_releases_and_keeps_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in FORMATS {
        let p = fresh(dir.path(), fmt, "d");
        {
            let img = open(&p, Some(fmt), &ImageOptions::default()).unwrap();
            img.device.write_at(&[0x6b; 65536], 1 << 20).unwrap();
            img.device
                .write_zeroes(0, 4096, ZeroFlags::default())
                .unwrap();
            // No close: the drop writes what the format holds and unlocks.
        }
        let out = Command::new("qemu-io")
            .args([
                "-f",
                fmt.name(),
                "-c",
                "read -P 0x6b 1M 64k",
                "-c",
                "read -P 0 0 4k",
            ])
            .arg(&p)
            .output()
            .expect("run qemu-io (install qemu-utils)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{fmt:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // qemu checks every format it can check (not raw, not vpc).
        if !matches!(fmt, Format::Raw | Format::Vpc) {
            diskimg_testutil::assert_qemu_check_clean(&p, fmt.name());
        }
        // And we may open it for writing again.
        open(&p, Some(fmt), &ImageOptions::default()).unwrap();
    }
}
