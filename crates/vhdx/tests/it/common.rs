//! Helpers shared by the test modules.

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, ExtentKind, FileStorage, OpenOptions, OptionList, Storage,
    map_all,
};

/// Opens `path` with our driver.
pub(crate) fn open(path: &Path, read_only: bool) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, read_only).unwrap());
    diskimg_vhdx::DRIVER
        .open(s, &unlinked().read_only(read_only))
        .unwrap()
}

/// Open options for the differencing images these tests make without a readable parent
/// (zero `parent_linkage`, which the driver refuses to verify unless told not to).
pub(crate) fn unlinked() -> OpenOptions {
    OpenOptions::new().driver_option(diskimg_vhdx::CHECK_PARENT_LINKAGE_OPTION, "off")
}

/// Opens `path` as `check` does (driver option `check=on`, qemu's `BDRV_O_CHECK`: BAT
/// entries that a normal open refuses are left for the check to report).
pub(crate) fn open_for_check(
    path: &Path,
    read_only: bool,
) -> diskimg_blockio::Result<Arc<dyn BlockDevice>> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, read_only).unwrap());
    diskimg_vhdx::DRIVER.open(
        s,
        &OpenOptions::new()
            .read_only(read_only)
            .driver_option("check", "on"),
    )
}

/// Opens `path` with our driver, returning the error.
pub(crate) fn try_open(
    path: &Path,
    read_only: bool,
) -> diskimg_blockio::Result<Arc<dyn BlockDevice>> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, read_only).unwrap());
    diskimg_vhdx::DRIVER.open(s, &OpenOptions::new().read_only(read_only))
}

/// Creates `path` with our driver.
#[allow(dead_code)]
pub(crate) fn create(path: &Path, size: u64, opts: &str) {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(path).unwrap());
    let mut req = CreateRequest::new(size, OptionList::parse(opts).unwrap());
    diskimg_vhdx::DRIVER.create(s, &mut req).unwrap();
    assert!(req.options.is_empty(), "options left: {:?}", req.options);
}

/// Asserts `dev` reads exactly like the raw file `raw` (sparse-aware: compares our
/// data extents byte by byte, and checks every data region of `raw` outside them is zero).
pub(crate) fn assert_reads_like_raw(dev: &dyn BlockDevice, raw: &Path) {
    let size = dev.virtual_size();
    let rs = FileStorage::open(raw, true).unwrap();
    assert_eq!(rs.len().unwrap(), size, "raw size");
    let ext = map_all(dev, 0, size).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut rbuf = vec![0u8; 1 << 20];
    let mut data_ranges = Vec::new();
    for e in &ext {
        let is_data = matches!(e.kind, ExtentKind::Data { .. });
        if is_data {
            data_ranges.push((e.offset, e.offset + e.len));
        }
        if !is_data {
            continue;
        }
        let mut pos = e.offset;
        while pos < e.offset + e.len {
            let n = (e.offset + e.len - pos).min(1 << 20) as usize;
            dev.read_at(&mut buf[..n], pos).unwrap();
            rs.read_exact_at(&mut rbuf[..n], pos).unwrap();
            assert!(buf[..n] == rbuf[..n], "data differs in [{pos}, +{n})");
            pos += n as u64;
        }
    }
    // Raw data outside our data extents must be zero, and we must read zero there.
    let mut pos = 0;
    while let Some(d) = rs.next_data(pos).unwrap() {
        if d >= size {
            break;
        }
        let h = rs.next_hole(d).unwrap().min(size);
        let mut p = d;
        while p < h {
            let n = (h - p).min(1 << 20) as usize;
            rs.read_exact_at(&mut rbuf[..n], p).unwrap();
            dev.read_at(&mut buf[..n], p).unwrap();
            assert!(
                buf[..n] == rbuf[..n],
                "differs in raw data region [{p}, +{n})"
            );
            p += n as u64;
        }
        pos = h;
    }
}

/// qemu's raw conversion of `img` (sparse) into `dir/name`.
pub(crate) fn qemu_to_raw(img: &Path, dir: &Path, name: &str) -> std::path::PathBuf {
    let out = dir.join(name);
    diskimg_testutil::qemu_img_ok(&[
        "convert",
        "-U",
        "-f",
        "vhdx",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    out
}
