//! The host epoch (`BlockDevice::host_epoch`): a constant for vhdx (payload blocks are
//! only allocated at the end of the file, never freed), plus the parent's count.

use diskimg_testutil::epoch::{check_backing_epoch, check_constant_epoch};
use diskimg_testutil::{qemu_create, tempdir};

use crate::common::{create, open};

#[test]
fn constant_while_open() {
    check_constant_epoch(&diskimg_vhdx::DRIVER, "vhdx", "block_size=1M", 1 << 20);
    check_constant_epoch(
        &diskimg_vhdx::DRIVER,
        "vhdx",
        "block_size=1M,subformat=fixed",
        1 << 20,
    );
}

#[test]
fn chain_adds_the_parent_count() {
    let dir = tempdir();
    let base = dir.path().join("base.vhdx");
    qemu_create(&base, "vhdx", "", Some("4M"));
    let child = dir.path().join("child.vhdx");
    create(
        &child,
        4 << 20,
        "backing_file=base.vhdx,backing_fmt=vhdx,block_size=1M",
    );
    check_backing_epoch(open(&child, false).as_ref(), open(&base, true));
}
