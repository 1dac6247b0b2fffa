//! `copy_range`: copy_file_range between files, buffered copies otherwise, errors.

use std::sync::Mutex;

use diskimg_blockio::{
    BlockDevice, DeviceInfo, Error, Extent, ExtentKind, FileStorage, MemStorage, ReadOnlyStorage,
    Result, Storage, check_range, copy_range, forward_storage,
};

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 7 + i / 4099) as u8))
        .collect()
}

fn file(dir: &std::path::Path, name: &str, content: &[u8]) -> FileStorage {
    let f = FileStorage::create(dir.join(name)).unwrap();
    f.write_all_at(content, 0).unwrap();
    f
}

fn read(s: &dyn Storage, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    s.read_exact_at(&mut b, off).unwrap();
    b
}

/// Records `start_writeback` hints; forwards the file when `expose` is set.
#[derive(Debug)]
struct Hints {
    inner: FileStorage,
    expose: bool,
    hints: Mutex<Vec<(u64, u64)>>,
    writes: Mutex<u64>,
}

impl Storage for Hints {
    forward_storage!(inner: read_exact_at, len, set_len, flush);
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        *self.writes.lock().unwrap() += 1;
        self.inner.write_all_at(buf, offset)
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        self.hints.lock().unwrap().push((offset, len));
    }
    fn host_file(&self) -> Option<&std::fs::File> {
        self.expose.then(|| self.inner.file())
    }
}

#[test]
fn file_to_file_at_offsets_grows_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(1, (3 << 20) + 123);
    let src = file(dir.path(), "src", &data);
    let dst = file(dir.path(), "dst", &[9u8; 4096]);
    assert!(src.host_file().is_some());
    // Unaligned offsets, a range longer than the fallback buffer, past the target's end.
    copy_range(&src, 77, &dst, 1000, (2 << 20) + 5).unwrap();
    assert_eq!(dst.len().unwrap(), 1000 + (2 << 20) + 5);
    assert_eq!(read(&dst, 0, 1000), vec![9u8; 1000]);
    assert_eq!(
        read(&dst, 1000, (2 << 20) + 5),
        &data[77..77 + (2 << 20) + 5]
    );
    // Zero-length copies do nothing, even at absurd offsets.
    copy_range(&src, u64::MAX, &dst, u64::MAX, 0).unwrap();
    // Within one file, without overlap.
    copy_range(&src, 0, &src, 4 << 20, 4096).unwrap();
    assert_eq!(read(&src, 4 << 20, 4096), &data[..4096]);
}

#[test]
fn mixed_storages_use_the_buffered_copy() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(3, (1 << 20) * 2 + 999);
    let n = data.len() as u64;
    let f = file(dir.path(), "f", &data);
    let m = MemStorage::new();
    copy_range(&f, 0, &m, 512, n).unwrap();
    assert_eq!(m.to_vec()[512..], data[..]);
    let back = FileStorage::create(dir.path().join("back")).unwrap();
    copy_range(&m, 512 + 10, &back, 3, n - 10).unwrap();
    assert_eq!(read(&back, 3, data.len() - 10), &data[10..]);
    let m2 = MemStorage::new();
    copy_range(&m, 512, &m2, 0, n).unwrap();
    assert_eq!(m2.to_vec(), data);
    // A read-only wrapper is a fine source (its file goes to the kernel) ...
    let ro = ReadOnlyStorage(FileStorage::open(dir.path().join("f"), true).unwrap());
    assert!(ro.host_file().is_some());
    let out = FileStorage::create(dir.path().join("out")).unwrap();
    copy_range(&ro, 100, &out, 0, 5000).unwrap();
    assert_eq!(read(&out, 0, 5000), &data[100..5100]);
    // ... but never a target.
    assert!(matches!(
        copy_range(&f, 0, &ro, 0, 10),
        Err(Error::ReadOnly)
    ));
    assert!(matches!(copy_range(&f, 0, &ro, 0, 0), Err(Error::ReadOnly)));
}

#[test]
fn short_sources_and_overflow_fail() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(dir.path(), "f", &bytes(5, 10_000));
    let g = FileStorage::create(dir.path().join("g")).unwrap();
    let m = MemStorage::from_vec(bytes(5, 10_000));
    // Past the end of the source: an error, not a hang or zero fill.
    for src in [&f as &dyn Storage, &m] {
        assert!(matches!(
            copy_range(src, 9000, &g, 0, 2000),
            Err(Error::Io { .. })
        ));
        assert!(matches!(
            copy_range(src, 20_000, &MemStorage::new(), 0, 1),
            Err(Error::Io { .. })
        ));
        assert!(matches!(
            copy_range(src, u64::MAX - 5, &g, 0, 10),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            copy_range(src, 0, &g, u64::MAX, 2),
            Err(Error::InvalidArgument(_))
        ));
    }
    // A huge range from a small file fails quickly too.
    assert!(copy_range(&f, 0, &g, 0, 1 << 40).is_err());
}

#[test]
fn writeback_is_hinted_on_the_target_and_files_bypass_writes() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(7, 70_000);
    let src = file(dir.path(), "src", &data);
    for expose in [true, false] {
        let dst = Hints {
            inner: FileStorage::create(dir.path().join(format!("d{expose}"))).unwrap(),
            expose,
            hints: Mutex::new(Vec::new()),
            writes: Mutex::new(0),
        };
        copy_range(&src, 5, &dst, 4096, 65536).unwrap();
        assert_eq!(*dst.hints.lock().unwrap(), vec![(4096, 65536)]);
        assert_eq!(read(&dst, 4096, 65536), &data[5..65541]);
        // The kernel copy writes the file directly; the fallback goes through writes.
        assert_eq!(*dst.writes.lock().unwrap() == 0, expose);
    }
}

/// A device without its own `write_from`: the trait's buffered default.
#[derive(Debug)]
struct Flat(MemStorage);

impl BlockDevice for Flat {
    fn info(&self) -> DeviceInfo {
        DeviceInfo::new("flat", self.0.len().unwrap())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.virtual_size())?;
        self.0.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        check_range(off, buf.len() as u64, self.virtual_size())?;
        self.0.write_all_at(buf, off)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn map(&self, off: u64, len: u64) -> Result<Extent> {
        Ok(Extent {
            offset: off,
            len,
            kind: ExtentKind::Data { offset: None },
        })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn default_write_from_is_buffered_and_range_checked() {
    let dev = Flat(MemStorage::from_vec(vec![0; 3 << 20]));
    assert!(dev.data_storage().is_none());
    let data = bytes(9, (2 << 20) + 17);
    let src = MemStorage::from_vec(data.clone());
    dev.write_from(100, (2 << 20) + 7, &src, 10).unwrap();
    let mut b = vec![0u8; (2 << 20) + 7];
    dev.read_at(&mut b, 100).unwrap();
    assert_eq!(b, &data[10..]);
    assert!(matches!(
        dev.write_from(3 << 20, 1, &src, 0),
        Err(Error::OutOfRange { .. })
    ));
    assert!(dev.write_from(0, 4096, &src, data.len() as u64).is_err());
}
