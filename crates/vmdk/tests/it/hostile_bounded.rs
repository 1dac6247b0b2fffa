//! Memory proportional to the file, never to a header's claims: grain directories are
//! held only for the part inside the file (qemu reads past the end of the file as
//! zeroes, so the rest are unallocated tables), and a compressed grain read never asks
//! for a buffer larger than the file. Each image is opened under a 1 MiB metadata
//! limit, well below what its header claims.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use diskimg_blockio::{
    BlockDevice, Driver, Limits, MemStorage, OpenOptions, Result, Storage, forward_storage,
};
use diskimg_testutil::{qemu_img_ok, qemu_info_json, qemu_io, qemu_read_raw, read_all, tempdir};

use crate::common::{DirFiles, p};

fn small_limits() -> Limits {
    let mut l = Limits::default();
    l.max_metadata_bytes = 1 << 20;
    l
}

/// A memory storage that records its largest read.
#[derive(Debug)]
struct MaxRead {
    inner: MemStorage,
    max: AtomicUsize,
}

impl Storage for MaxRead {
    forward_storage!(inner: len, set_len, flush, write_all_at);
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.max.fetch_max(buf.len(), Ordering::Relaxed);
        self.inner.read_exact_at(buf, offset)
    }
}

fn open_bytes(img: &[u8], limits: Limits) -> (Arc<MaxRead>, Result<Arc<dyn BlockDevice>>) {
    let s = Arc::new(MaxRead {
        inner: MemStorage::from_vec(img.to_vec()),
        max: AtomicUsize::new(0),
    });
    let opts = OpenOptions::new().read_only(true).limits(limits);
    let dev = diskimg_vmdk::DRIVER.open(s.clone(), &opts);
    (s, dev)
}

fn patch(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// The qemu image at `img` with its grain directory moved to a sector appended at the
/// end of the file (no redundant directory) and `capacity` sectors: with a large
/// capacity, the directory reaches far past the end of the file, over nothing else.
fn moved_directory(img: &std::path::Path, capacity: u64) -> Vec<u8> {
    let mut b = std::fs::read(img).unwrap();
    let gd = usize::try_from(u64::from_le_bytes(b[56..64].try_into().unwrap()) * 512).unwrap();
    let sector = b[gd..gd + 512].to_vec();
    let at = b.len() as u64 / 512;
    b.extend_from_slice(&sector);
    patch(&mut b, 12, &capacity.to_le_bytes());
    patch(&mut b, 56, &at.to_le_bytes());
    let flags = u32::from_le_bytes(b[8..12].try_into().unwrap()) & !2;
    patch(&mut b, 8, &flags.to_le_bytes());
    b
}

#[test]
fn a_directory_past_the_end_of_the_file_is_not_allocated() {
    let dir = tempdir();
    let img = dir.path().join("t.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "64M"]);
    qemu_io(&img, "vmdk", &["write -P 7 0 64k"]);
    // capacity (byte 12) 2^37 sectors: 2^21 directory entries (8 MiB, twice with the
    // redundant one) in a file of a few hundred KiB.
    let b = moved_directory(&img, 1 << 37);
    std::fs::write(&img, &b).unwrap();
    // qemu opens it (the directory's missing part reads as zeroes): so do we.
    let q = qemu_info_json(&img, "vmdk");
    assert_eq!(q["virtual-size"].as_u64(), Some(1 << 46));
    let (s, dev) = open_bytes(&b, small_limits());
    let dev = dev.expect("opens under a 1 MiB limit");
    assert_eq!(dev.virtual_size(), 1 << 46);
    assert!(s.max.load(Ordering::Relaxed) <= b.len());
    let mut buf = vec![0u8; 128 << 10];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf[..64 << 10].iter().all(|&x| x == 7));
    assert!(buf[64 << 10..].iter().all(|&x| x == 0));
    // Far past the directory's part in the file: unallocated, as in qemu.
    dev.read_at(&mut buf, 1 << 45).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    let out = qemu_io(&img, "vmdk", &["read -P 0 35184372088832 128k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let r = dev.check(diskimg_blockio::RepairMode::None).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
}

#[test]
fn a_sesparse_directory_past_the_end_of_the_file_is_not_allocated() {
    let dir = tempdir();
    let mut se = crate::extents::sesparse();
    // grain directory size (byte 136): 2^16 sectors, 4 Mi entries (32 MiB).
    patch(&mut se, 136, &(1u64 << 16).to_le_bytes());
    std::fs::write(dir.path().join("se.vmdk"), &se).unwrap();
    let desc = dir.path().join("d.vmdk");
    let text = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"seSparse\"\n\nRW 2048 SESPARSE \"se.vmdk\"\n";
    std::fs::write(&desc, text).unwrap();
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(text.as_bytes().to_vec()));
    let opts = OpenOptions::new()
        .read_only(true)
        .limits(small_limits())
        .files(Arc::new(DirFiles(dir.path().to_path_buf())));
    let dev = diskimg_vmdk::DRIVER
        .open(s, &opts)
        .expect("opens under a 1 MiB limit");
    let ours = read_all(dev.as_ref());
    let q = qemu_read_raw(&desc, "vmdk");
    assert_eq!(ours[..], q[..1 << 20]);
    assert!(ours[..4096].iter().any(|&x| x != 0), "grain 0 holds data");
}

#[test]
fn a_huge_compressed_grain_reads_no_more_than_the_file() {
    let dir = tempdir();
    let src = dir.path().join("s.vmdk");
    let img = dir.path().join("st.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&src), "1M"]);
    qemu_io(&src, "vmdk", &["write -P 9 0 64k"]);
    let o = "subformat=streamOptimized";
    qemu_img_ok(&["convert", "-O", "vmdk", "-o", o, &p(&src), &p(&img)]);
    let mut b = std::fs::read(&img).unwrap();
    // grainSize (byte 20) 0x10000 sectors (32 MiB) in the header and in the footer's copy.
    let footer_header = b.len() - 1024;
    for at in [20, footer_header + 20] {
        patch(&mut b, at, &0x10000u64.to_le_bytes());
    }
    let (s, dev) = open_bytes(&b, Limits::default());
    let dev = dev.expect("opens");
    let mut buf = vec![0u8; 128 << 10];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf[..64 << 10].iter().all(|&x| x == 9));
    let max = s.max.load(Ordering::Relaxed);
    assert!(
        max <= b.len(),
        "a read of {max} bytes from a file of {}",
        b.len()
    );
}

#[test]
fn directories_beyond_qemus_bound_are_refused_like_qemu() {
    let dir = tempdir();
    let img = dir.path().join("t.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "64M"]);
    // 2^25 + 1 directory entries of 512 tables of 64 KiB grains: qemu's bound is 2^25.
    for (entries, ok) in [((1u64 << 25) + 1, false), (1 << 25, true)] {
        let b = moved_directory(&img, entries << 16);
        let hostile = dir.path().join("h.vmdk");
        std::fs::write(&hostile, &b).unwrap();
        let q = diskimg_testutil::qemu_img(&["info", &p(&hostile)]);
        let qerr = String::from_utf8_lossy(&q.stderr).into_owned();
        assert_eq!(q.status.success(), ok, "qemu: {qerr}");
        match open_bytes(&b, small_limits()).1 {
            Ok(_) => assert!(ok, "opened {entries} entries"),
            Err(e) => {
                assert!(!ok, "{e}");
                assert!(e.to_string().contains("L1 size too big"), "{e}");
                assert!(qerr.contains("L1 size too big"), "{qerr}");
            }
        }
    }
}

/// Counts the extent files a descriptor makes us open.
#[derive(Debug)]
struct CountingFiles(DirFiles, AtomicUsize);

impl diskimg_blockio::HostFiles for CountingFiles {
    fn open(
        &self,
        name: &str,
        purpose: diskimg_blockio::FilePurpose,
        writable: bool,
    ) -> Result<Arc<dyn Storage>> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.open(name, purpose, writable)
    }
    fn create(
        &self,
        name: &str,
        purpose: diskimg_blockio::FilePurpose,
    ) -> Result<Arc<dyn Storage>> {
        self.0.create(name, purpose)
    }
}

#[test]
fn a_sparse_file_named_many_times_is_refused_at_its_second_line() {
    let dir = tempdir();
    let img = dir.path().join("s.vmdk");
    qemu_img_ok(&["create", "-q", "-f", "vmdk", &p(&img), "1M"]);
    // 4000 lines naming the same sparse file: each would hold its grain directory.
    let mut text = String::from(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\n",
    );
    for _ in 0..4000 {
        text.push_str("RW 2048 SPARSE \"s.vmdk\"\n");
    }
    let desc = dir.path().join("d.vmdk");
    std::fs::write(&desc, &text).unwrap();
    let files = Arc::new(CountingFiles(
        DirFiles(dir.path().to_path_buf()),
        AtomicUsize::new(0),
    ));
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(text.into_bytes()));
    let opts = OpenOptions::new().read_only(true).files(files.clone());
    let e = diskimg_vmdk::DRIVER.open(s, &opts).map(drop).unwrap_err();
    assert!(e.to_string().contains("named twice"), "{e}");
    assert_eq!(
        files.1.load(Ordering::Relaxed),
        2,
        "stopped at the second line"
    );
}
