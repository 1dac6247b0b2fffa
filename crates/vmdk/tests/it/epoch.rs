//! The host epoch (`BlockDevice::host_epoch`): a constant for vmdk (grains are only
//! appended, never freed or moved), plus the backing image's count.

use diskimg_testutil::epoch::{check_backing_epoch, check_constant_epoch};
use diskimg_testutil::{qemu_create, qemu_create_overlay, tempdir};

use crate::common::open;

#[test]
fn constant_while_open() {
    check_constant_epoch(&diskimg_vmdk::DRIVER, "vmdk", "", 64 << 10);
    check_constant_epoch(&diskimg_vmdk::DRIVER, "vmdk", "zeroed_grain=on", 64 << 10);
}

#[test]
fn chain_adds_the_backing_count() {
    let dir = tempdir();
    let base = dir.path().join("base.vmdk");
    let child = dir.path().join("child.vmdk");
    qemu_create(&base, "vmdk", "", Some("1M"));
    qemu_create_overlay(&child, "vmdk", "base.vmdk", "vmdk", None);
    let parent = open(&base, true).unwrap();
    check_backing_epoch(open(&child, false).unwrap().as_ref(), parent);
}
