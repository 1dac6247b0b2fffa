#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Integration tests for the vdi driver, cross-checked against qemu-img / qemu-io.

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, FileStorage, OpenOptions, OptionList, Storage,
};

mod crash;
mod epoch;
mod hostile;
mod hostile_bounded;
mod interop;
mod model;
mod resize;
mod workload;

/// Creates `path` with our driver.
pub(crate) fn create(path: &Path, size: u64, opts: &str) {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(path).unwrap());
    let mut req = CreateRequest::new(size, OptionList::parse(opts).unwrap());
    diskimg_vdi::DRIVER.create(s, &mut req).unwrap();
    assert!(req.options.is_empty(), "options left: {:?}", req.options);
}

/// Opens `path` with our driver.
pub(crate) fn open(path: &Path, read_only: bool) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, read_only).unwrap());
    diskimg_vdi::DRIVER
        .open(s, &OpenOptions::new().read_only(read_only))
        .unwrap()
}

/// Opens in-memory bytes with our driver.
pub(crate) fn open_bytes(bytes: Vec<u8>) -> diskimg_blockio::Result<Arc<dyn BlockDevice>> {
    let s: Arc<dyn Storage> = Arc::new(diskimg_blockio::MemStorage::from_vec(bytes));
    diskimg_vdi::DRIVER.open(s, &OpenOptions::new())
}
