//! `close()` means the same for every format (issue 17): writes, zeroes, discards and
//! resizes fail with `Error::Closed` afterwards, reads still work, a second close does
//! nothing; and the files' locks go with the close.

use diskimg::{Format, ImageOptions, OptionList, create, open};
use diskimg_blockio::{Error, Preallocation, ZeroFlags};

#[test]
fn close_is_uniform_across_formats() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in [
        Format::Raw,
        Format::Qcow2,
        Format::Vdi,
        Format::Vpc,
        Format::Vmdk,
        Format::Vhdx,
    ] {
        let p = dir.path().join(format!("c.{}", fmt.name()));
        create(
            &p,
            fmt,
            Some(4 << 20),
            OptionList::new(),
            &ImageOptions::default(),
        )
        .unwrap();
        let img = open(&p, Some(fmt), &ImageOptions::default()).unwrap();
        let dev = img.device.clone();
        dev.write_at(&[0x5a; 512], 0).unwrap();
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
        img.close().unwrap();
        let mut buf = [0u8; 512];
        dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0x5a; 512], "{fmt:?}: reads after close");
        drop((img, dev));
        // What was written before the close is in the file.
        let again = open(&p, Some(fmt), &ImageOptions::read_only(true)).unwrap();
        again.device.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0x5a; 512], "{fmt:?}");
    }
}
