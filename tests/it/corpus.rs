//! Every sample of qemu's test corpus through every driver: a clean error or data, never a
//! panic or a hang (`tests/corpus/qemu-sample-images` in this repository).

use std::sync::Arc;

use diskimg::Format;
use diskimg_blockio::{FileStorage, OpenOptions, RepairMode, Storage};
use diskimg_testutil::{corpus_dir, corpus_file, tempdir};

/// Opens `path` read-only with `fmt`'s driver and, if it opens, maps the whole disk and
/// reads a bounded amount of every extent kind, then checks it.
fn exercise(fmt: Format, path: &std::path::Path) -> bool {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, true).unwrap());
    let driver = fmt.driver().unwrap();
    let _ = driver.probe(storage.as_ref());
    let Ok(dev) = driver.open(storage, &OpenOptions::new().read_only(true)) else {
        return false;
    };
    let size = dev.virtual_size();
    let (mut pos, mut budget) = (0u64, 16u64 << 20);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..10_000 {
        if pos >= size {
            break;
        }
        let Ok(e) = dev.map(pos, size - pos) else {
            break;
        };
        assert!(
            e.len > 0 && e.offset == pos,
            "{fmt}: bad extent {e:?} at {pos}"
        );
        let n = e.len.min(buf.len() as u64).min(budget);
        if n > 0 {
            let _ = dev.read_at(&mut buf[..n as usize], pos);
            budget -= n;
        }
        pos += e.len;
    }
    let _ = dev.read_at(&mut buf[..512], size.saturating_sub(512));
    let _ = dev.check(RepairMode::None);
    true
}

#[test]
fn every_corpus_sample_through_every_driver() {
    let dir = tempdir();
    let mut names: Vec<String> = std::fs::read_dir(corpus_dir().join("qemu-sample-images"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".bz2").map(str::to_string))
        .collect();
    names.sort();
    assert!(names.len() >= 16, "corpus incomplete: {names:?}");
    let mut opened = 0;
    for name in &names {
        let path = corpus_file(name, dir.path());
        for fmt in Format::ALL {
            if exercise(fmt, &path) && fmt != Format::Raw {
                opened += 1;
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
    // The samples of our formats that qemu opens must open here too (7 of them: 3 vpc,
    // 3 vhdx, 1 vmdk; afl5/afl9 are refused).
    assert!(
        opened >= 7,
        "only {opened} samples opened with a non-raw driver"
    );
}
