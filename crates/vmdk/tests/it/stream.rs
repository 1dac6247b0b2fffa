//! The stream-optimized writer in two steps (`compress_units` on any thread, then
//! `write_compressed_units`), checked with qemu-img.

use diskimg_blockio::{CompressedUnits, PackedUnit};
use diskimg_testutil::{assert_qemu_check_clean, pattern, qemu_read_raw, read_all, tempdir};

use crate::common::{create, open};

#[test]
fn grains_compressed_on_threads_are_appended_in_order() {
    let dir = tempdir();
    let img = dir.path().join("s.vmdk");
    // A partial last grain of 4 KiB.
    let size = (8 << 20) + 4096;
    create(&img, size, "subformat=streamOptimized").unwrap();
    let dev = open(&img, false).unwrap();
    assert!(dev.needs_compressed_writes());
    let g = dev.compressed_write_granularity().unwrap() as usize;
    let mut want = vec![0u8; size as usize];
    let run = pattern(3, 5 * g);
    let tail = pattern(4, 4096);
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| dev.compress_units(&run, 2 * g as u64).unwrap());
        let b = sc.spawn(|| dev.compress_units(&tail, size - 4096).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!((a.units.len(), b.units.len()), (5, 1));
    assert_eq!(read_all(dev.as_ref()), want, "nothing written yet");
    // Records of other grains, plain units and runs of the wrong shape are refused.
    let moved = CompressedUnits {
        offset: 40 * g as u64,
        ..a.clone()
    };
    assert!(dev.write_compressed_units(moved).is_err());
    let plain = CompressedUnits {
        offset: 0,
        len: g as u64,
        units: vec![PackedUnit::Plain(vec![1; g])],
    };
    assert!(dev.write_compressed_units(plain).is_err());
    let mut short = a.clone();
    short.units.pop();
    assert!(dev.write_compressed_units(short).is_err());
    dev.write_compressed_units(b).unwrap();
    dev.write_compressed_units(a.clone()).unwrap();
    want[2 * g..7 * g].copy_from_slice(&run);
    want[size as usize - 4096..].copy_from_slice(&tail);
    let err = dev.write_compressed_units(a).unwrap_err().to_string();
    assert!(err.contains("streamOptimized"), "{err}");
    dev.flush().unwrap();
    assert_eq!(read_all(dev.as_ref()), want);
    drop(dev);
    assert_qemu_check_clean(&img, "vmdk");
    assert_eq!(qemu_read_raw(&img, "vmdk"), want);
}

fn le32(b: &[u8], off: usize) -> usize {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize
}

#[test]
fn grain_records_longer_than_a_grain_read_like_qemu() {
    // qemu's streams never exceed a grain by much, so a grain is read with one call of a
    // grain and a sector; a record whose stream is longer (here: stored blocks with sync
    // points, 70 KiB for a 64 KiB grain) needs the rest read, as qemu does.
    let dir = tempdir();
    let src = dir.path().join("s.raw");
    let img = dir.path().join("s.vmdk");
    let mut want = vec![0u8; 1 << 20];
    let grain = pattern(9, 65536);
    want[..65536].copy_from_slice(&grain);
    std::fs::write(&src, &want).unwrap();
    let (s, i) = (src.to_string_lossy(), img.to_string_lossy());
    diskimg_testutil::qemu_img_ok(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        &s,
        &i,
    ]);
    let mut b = std::fs::read(&img).unwrap();
    // qemu writes the grain directory up front (header gdOffset at 56); entry 0 of the
    // first grain table is grain 0's record. The long record is appended and pointed to.
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize;
    let gt = le32(&b, gd * 512) * 512;
    assert_ne!(le32(&b, gt), 0, "grain 0 allocated");
    let mut z = flate2::Compress::new(flate2::Compression::none(), true);
    let mut stream = vec![0u8; 128 << 10];
    for piece in grain.chunks(256) {
        let before = z.total_in() as usize;
        z.compress(
            piece,
            &mut stream[z.total_out() as usize..],
            flate2::FlushCompress::Sync,
        )
        .unwrap();
        assert_eq!(z.total_in() as usize - before, piece.len());
    }
    z.compress(
        &[],
        &mut stream[z.total_out() as usize..],
        flate2::FlushCompress::Finish,
    )
    .unwrap();
    stream.truncate(z.total_out() as usize);
    assert!(stream.len() > 66048, "{}", stream.len());
    let mut rec = vec![0u8; 12];
    rec[8..12].copy_from_slice(&(stream.len() as u32).to_le_bytes());
    rec.extend_from_slice(&stream);
    rec.resize(rec.len().div_ceil(512) * 512, 0);
    let at = b.len().div_ceil(512);
    b.resize(at * 512, 0);
    b.extend_from_slice(&rec);
    b[gt..gt + 4].copy_from_slice(&(at as u32).to_le_bytes());
    std::fs::write(&img, &b).unwrap();
    assert_eq!(
        qemu_read_raw(&img, "vmdk"),
        want,
        "qemu reads the long record"
    );
    let dev = open(&img, true).unwrap();
    assert_eq!(read_all(dev.as_ref()), want);
    // A part of the grain reads the same.
    let mut part = vec![0u8; 4096];
    dev.read_at(&mut part, 8192).unwrap();
    assert_eq!(part, want[8192..12288]);
}
