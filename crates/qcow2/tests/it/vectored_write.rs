//! Vectored writes into allocated clusters (a virtio-blk request's guest pages) go to a
//! buffered host file as one vectored write per host run, straight from the caller's
//! buffers (`overwrite_vectored.rs`); anything else takes the gathering default. Checked
//! byte for byte against a model and with qemu-img.

use std::io::IoSlice;
use std::path::Path;
use std::sync::{Arc, Mutex};

use diskimg_blockio::{BlockDevice, Driver, FileStorage, Result, Storage, forward_storage};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{Model, assert_qemu_check_clean, pattern, qemu_read_raw, read_all};

use super::{create, opts};

const CS: usize = 65536;

/// A buffered [`FileStorage`] that counts the host writes of each kind.
#[derive(Debug)]
struct Counting {
    inner: FileStorage,
    /// (vectored writes, buffers in them, plain writes).
    seen: Mutex<(usize, usize, usize)>,
}

impl Storage for Counting {
    forward_storage!(inner: read_exact_at, len, set_len, flush, host_file);
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.seen.lock().unwrap().2 += 1;
        self.inner.write_all_at(buf, offset)
    }
    fn write_vectored_all_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let mut s = self.seen.lock().unwrap();
        s.0 += 1;
        s.1 += bufs.len();
        self.inner.write_vectored_all_at(bufs, offset)
    }
}

fn open_counting(path: &Path) -> (Arc<Counting>, Arc<dyn BlockDevice>) {
    let c = Arc::new(Counting {
        inner: FileStorage::open(path, false).unwrap(),
        seen: Mutex::new((0, 0, 0)),
    });
    let s: Arc<dyn Storage> = c.clone();
    (
        c,
        DRIVER
            .open(s, &opts(path.parent().unwrap(), false))
            .unwrap(),
    )
}

/// `data` cut into buffers of these lengths in turn (a zero-length one included).
fn cut<'a>(data: &'a [u8], lens: &[usize]) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < data.len() {
        let n = lens[i % lens.len()].min(data.len() - at);
        out.push(IoSlice::new(&data[at..at + n]));
        at += n;
        i += 1;
    }
    out
}

#[test]
fn scattered_overwrite_goes_out_per_host_run_and_lands_once() {
    let dir = diskimg_testutil::tempdir();
    let path = dir.path().join("v.qcow2");
    create(&path, 1 << 20, "").unwrap();
    let (c, dev) = open_counting(&path);
    let mut model = Model::zeroed(1 << 20);
    // Clusters 1, 0, 2, 3 in that order: guest 0..4 CS is three host runs (cluster 0,
    // cluster 1, clusters 2-3).
    for k in [1usize, 0, 2, 3] {
        let d = pattern(k as u64, CS);
        dev.write_at(&d, (k * CS) as u64).unwrap();
        model.write(k * CS, &d);
    }
    *c.seen.lock().unwrap() = (0, 0, 0);
    let (off, len) = (1000, 3 * CS + 5000);
    let data = pattern(99, len);
    let bufs = cut(&data, &[4096, 0, 7, CS + 13, 512]);
    dev.write_vectored_at(&bufs, off as u64).unwrap();
    model.write(off, &data);
    let (vectored, parts, plain) = *c.seen.lock().unwrap();
    assert_eq!((vectored, plain), (3, 0), "one vectored write per host run");
    // Straight from the caller's buffers: every non-empty one (some cut in two at a
    // run's end) goes out as it is, none gathered.
    let whole = bufs.iter().filter(|b| !b.is_empty()).count();
    assert!(
        (whole..whole + 3).contains(&parts),
        "{parts} parts of {whole}"
    );
    assert!(read_all(dev.as_ref()) == model.bytes, "our read-back");
    dev.flush().unwrap();
    drop(dev);
    assert!(
        qemu_read_raw(&path, "qcow2") == model.bytes,
        "qemu's read-back"
    );
    assert_qemu_check_clean(&path, "qcow2");
}

#[test]
fn a_vectored_write_touching_unallocated_clusters_takes_the_default() {
    let dir = diskimg_testutil::tempdir();
    let path = dir.path().join("v.qcow2");
    create(&path, 1 << 20, "").unwrap();
    let (c, dev) = open_counting(&path);
    let mut model = Model::zeroed(1 << 20);
    let d = pattern(1, CS);
    dev.write_at(&d, 0).unwrap();
    model.write(0, &d);
    *c.seen.lock().unwrap() = (0, 0, 0);
    // Cluster 0 allocated, cluster 1 not: the whole request allocates as before.
    let data = pattern(2, 2 * CS - 100);
    dev.write_vectored_at(&cut(&data, &[4096]), 50).unwrap();
    model.write(50, &data);
    assert_eq!(c.seen.lock().unwrap().0, 0, "no in-place vectored write");
    assert!(read_all(dev.as_ref()) == model.bytes);
    dev.flush().unwrap();
    drop(dev);
    assert!(qemu_read_raw(&path, "qcow2") == model.bytes);
    assert_qemu_check_clean(&path, "qcow2");
}
