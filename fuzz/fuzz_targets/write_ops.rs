//! Opens arbitrary bytes read-write as one of the writable formats, then runs a fuzzed
//! sequence of write / write_zeroes / discard / read / map / flush on it, closes it, and
//! finally maps, reads and checks the result: writes on hostile images must not panic,
//! hang or allocate without bound either.
//!
//! Input layout: `[format selector][op count N][N ops of 12 bytes][image bytes…]`; an op is
//! `[kind][fill byte][offset: u32 LE, in 512-byte units][length: u32 LE][sub-sector shift:
//! u16 LE]` (`fuzz/common/ops.rs`).
#![no_main]
#[path = "../common/ops.rs"]
mod ops;

use diskimg_blockio::{Driver, OpenOptions, Storage};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fn driver(sel: u8) -> &'static dyn Driver {
    match sel % 5 {
        0 => &diskimg_qcow2::DRIVER,
        1 => &diskimg_vmdk::DRIVER,
        2 => &diskimg_vdi::DRIVER,
        3 => &diskimg_vhdx::DRIVER,
        _ => &diskimg_vhd::DRIVER,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = data.split_first() else {
        return;
    };
    let Some((op_bytes, image)) = ops::split_ops(rest) else {
        return;
    };
    let Some(storage) = ops::storage_with(image) else {
        return;
    };
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let Ok(dev) = driver(*sel).open(storage.clone(), &OpenOptions::new()) else {
        return;
    };
    ops::run_ops(dev.as_ref(), op_bytes);
    // Close writes what the format keeps until then (qcow2's persistent bitmaps).
    let _ = dev.close();
    drop(dev);
    // Whatever the writes left behind must still open (or fail) without panicking.
    diskimg_testutil::exercise_driver(driver(*sel), &ops::bytes_of(storage.as_ref()));
});
