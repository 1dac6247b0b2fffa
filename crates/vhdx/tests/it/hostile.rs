//! Hostile input: truncations and bit flips of fixtures and corpus samples, and the
//! qemu-iotests scenarios for vhdx, each a clean error (never a panic).

use std::sync::Arc;

use diskimg_blockio::{CreateRequest, Driver, Error, MemStorage, OpenOptions, OptionList, Storage};
use diskimg_testutil::{corpus_file, corruption_sweep, exercise_driver, tempdir};

fn small_image(opts: &str) -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(3 << 20, OptionList::parse(opts).unwrap());
    diskimg_vhdx::DRIVER.create(s.clone(), &mut req).unwrap();
    let st: Arc<dyn Storage> = s.clone();
    let dev = diskimg_vhdx::DRIVER.open(st, &OpenOptions::new()).unwrap();
    dev.write_at(&[0xaa; 8192], 1 << 20).unwrap();
    drop(dev);
    s.to_vec()
}

/// Flips bytes in the interesting structures (headers, region table, metadata, BAT).
fn flip_structures(img: &[u8], spots: &[(usize, usize)]) {
    flip_structures_step(img, spots, 13);
}

fn flip_structures_step(img: &[u8], spots: &[(usize, usize)], step: usize) {
    for &(start, len) in spots {
        let mut i = start;
        while i < (start + len).min(img.len()) {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut v = img.to_vec();
                v[i] ^= flip;
                exercise_driver(&diskimg_vhdx::DRIVER, &v);
            }
            i += step;
        }
    }
}

#[test]
fn sweep_fixtures() {
    for opts in ["block_size=1M", "block_size=1M,backing_file=p.vhdx"] {
        let img = small_image(opts);
        assert!(exercise_driver(&diskimg_vhdx::DRIVER, &img));
        corruption_sweep(&diskimg_vhdx::DRIVER, &img, 64 << 10, 64);
        // Headers, region table, metadata table + items, start of the BAT.
        flip_structures(
            &img,
            &[
                (64 << 10, 96),
                (192 << 10, 96),
                (2 << 20, 256),
                ((2 << 20) + (64 << 10), 200),
                (3 << 20, 64),
            ],
        );
    }
}

#[test]
fn sweep_corpus_samples() {
    let dir = tempdir();
    for name in [
        "iotest-dirtylog-10G-4M.vhdx",
        "iotest-dynamic-1G.vhdx",
        "test-disk2vhd.vhdx",
    ] {
        let path = corpus_file(name, dir.path());
        let img = std::fs::read(&path).unwrap();
        // Only the metadata part (and the log) matters; the payload is large.
        let head = &img[..img.len().min(5 << 20)];
        let mut len = 0;
        while len < head.len() {
            exercise_driver(&diskimg_vhdx::DRIVER, &head[..len]);
            len += 256 << 10;
        }
        flip_structures(head, &[(64 << 10, 96), (192 << 10, 96)]);
        if name.contains("dirtylog") {
            // The log entries themselves (torn entries must be ignored, not trusted).
            assert!(exercise_driver(&diskimg_vhdx::DRIVER, &img));
            flip_structures_step(&img, &[(1 << 20, 8192)], 61);
        }
    }
}

#[test]
fn iotest_scenarios() {
    let img = small_image("block_size=1M");
    let open = |v: Vec<u8>| {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(v));
        diskimg_vhdx::DRIVER.open(s, &OpenOptions::new().read_only(true))
    };
    // Both headers broken: no valid header.
    let mut v = img.clone();
    v[64 << 10] ^= 1;
    v[128 << 10] ^= 1;
    assert!(matches!(open(v), Err(Error::Corrupt { .. })));
    // One header broken: the other one is used.
    let mut v = img.clone();
    v[(64 << 10) + 200] ^= 1;
    assert!(open(v).is_ok());
    // Not a vhdx at all.
    assert!(open(vec![0u8; 1 << 20]).is_err());
    // A BAT entry pointing past the end of the file (truncated image): refused at open
    // as qemu does; a check open works, reads of that block fail cleanly and check
    // reports it.
    let truncated = img[..img.len() - (512 << 10)].to_vec();
    let e = open(truncated.clone()).unwrap_err().to_string();
    assert!(e.contains("Image has probably been truncated"), "{e}");
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(truncated));
    let opts = OpenOptions::new()
        .read_only(true)
        .driver_option("check", "on");
    let dev = diskimg_vhdx::DRIVER.open(s, &opts).unwrap();
    let mut b = [0u8; 512];
    assert!(dev.read_at(&mut b, (2 << 20) - 512).is_err());
    let r = dev.check(diskimg_blockio::RepairMode::None).unwrap();
    assert_eq!(r.corruptions, 1, "{r:?}");
    // Empty file.
    assert!(open(vec![]).is_err());
}
