#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Integration tests for diskimg-vhd, cross-checked against qemu-img / qemu-io.

mod corpus;
mod crash;
mod differencing;
mod epoch;
mod guard;
mod hostile;
mod hostile_bounded;
mod interop;
mod model;
mod workload;

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, FileStorage, OpenOptions, OptionList, Storage,
};

/// Opens `path` with our driver.
pub fn open(path: &Path, ro: bool) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, ro).unwrap());
    diskimg_vhd::DRIVER
        .open(s, &OpenOptions::new().read_only(ro))
        .unwrap()
}

/// Creates `path` with our driver and `-o` options.
pub fn create(path: &Path, size: u64, opts: &str) {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(path).unwrap());
    let mut req = CreateRequest::new(size, OptionList::parse(opts).unwrap());
    diskimg_vhd::DRIVER.create(s, &mut req).unwrap();
    assert!(req.options.is_empty(), "options left: {:?}", req.options);
}

/// qemu's virtual size for `path` read as vpc.
pub fn qemu_size(path: &Path) -> u64 {
    diskimg_testutil::qemu_info_json(path, "vpc")["virtual-size"]
        .as_u64()
        .unwrap()
}
