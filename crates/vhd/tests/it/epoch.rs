//! The host epoch (`BlockDevice::host_epoch`): a constant for vpc (blocks are only
//! appended, BAT entries never cleared), plus the parent's count.

use diskimg_testutil::epoch::{check_backing_epoch, check_constant_epoch};
use diskimg_testutil::{qemu_create, tempdir};

use crate::differencing::make_child;
use crate::open;

#[test]
fn constant_while_open() {
    check_constant_epoch(&diskimg_vhd::DRIVER, "vpc", "", 2 << 20);
    check_constant_epoch(&diskimg_vhd::DRIVER, "vpc", "subformat=fixed", 2 << 20);
}

#[test]
fn chain_adds_the_parent_count() {
    let dir = tempdir();
    let base = dir.path().join("base.vhd");
    qemu_create(&base, "vpc", "", Some("4M"));
    make_child(dir.path(), "child.vhd", "base.vhd");
    let child = open(&dir.path().join("child.vhd"), false);
    check_backing_epoch(child.as_ref(), open(&base, true));
}
