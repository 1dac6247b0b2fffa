//! qcow2 metadata that only a read-write open, its writes and its close reach, on hostile
//! bytes: persistent bitmaps loaded and marked in use at open and stored anew at close
//! (`features/bitmap*.rs`, `tracked.rs`), offline bitmap edits (`edit_bitmaps`), extended
//! L2 allocation (`ext_alloc.rs`), invalid entries met by guest I/O (`invalid_entry.rs`),
//! snapshot tables validated where a snapshot is used (open / apply / delete / create),
//! `check -r all` repairs and deferred L2 tables. (No passphrase is given: a hostile LUKS
//! header may ask for up to 2^26 PBKDF2 iterations per key slot, a bounded but slow open.)
//!
//! Input layout: `[flags][op count N][N ops of 12 bytes][image bytes…]`, ops as in
//! `write_ops` (`fuzz/common/ops.rs`). Flags: bit 0 edits a bitmap offline first (bits 6-7
//! pick add / clear / disable / remove), bit 1 opens with `x-deferred-tables=on`, bit 2
//! opens with `check=on` and runs `check -r all`, bit 3 reads the first two snapshots
//! through their views, bit 4 applies the first snapshot, bit 5 deletes it; a snapshot is
//! created after the ops when bits 4 and 5 are both clear. The storage claims a quarter
//! to the power of bits 6-7 of its bytes are allocated on the host (the
//! metadata-preallocation test of `map`).
#![no_main]
#[path = "../common/ops.rs"]
mod ops;
#[path = "../common/touch.rs"]
mod touch;

use diskimg_blockio::{
    BitmapOp, BlockDevice, Driver, MemStorage, OpenOptions, RepairMode, Result, Storage,
    forward_storage,
};
use diskimg_qcow2::DRIVER;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// A memory storage that claims `len >> shift` bytes are allocated on the host, so the
/// metadata-preallocation test of `map` (`features/prealloc_map.rs`) runs.
#[derive(Debug)]
struct Sparse {
    inner: MemStorage,
    shift: u32,
}

impl Storage for Sparse {
    forward_storage!(inner: read_exact_at, write_all_at, len, set_len, flush, write_zeroes, discard);
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        Ok(Some(self.inner.len()? >> self.shift))
    }
}

fn options(flags: u8) -> OpenOptions {
    let mut o = OpenOptions::new();
    if flags & 2 != 0 {
        o = o.driver_option("x-deferred-tables", "on");
    }
    if flags & 4 != 0 {
        o = o.driver_option("check", "on");
    }
    o
}

fn bitmaps(dev: &dyn BlockDevice) {
    if let Some(b) = dev.as_bitmaps() {
        for info in b.list().iter().take(4) {
            let _ = b.read(&info.name);
        }
    }
}

fn snapshots(dev: &dyn BlockDevice, flags: u8) {
    let Some(s) = dev.as_snapshots() else {
        return;
    };
    let ids: Vec<String> = dev.info().snapshots.iter().map(|i| i.id.clone()).collect();
    if flags & 8 != 0 {
        for id in ids.iter().take(2) {
            if let Ok(view) = s.open(id) {
                touch::touch(view.as_ref(), 32);
            }
        }
    }
    if let Some(first) = ids.first() {
        if flags & 16 != 0 {
            let _ = s.apply(first);
        }
        if flags & 32 != 0 {
            let _ = s.delete(first);
        }
    }
}

fn edit_offline(storage: &Arc<dyn Storage>, flags: u8) {
    let op = match flags >> 6 {
        0 => BitmapOp::Add {
            granularity: Some(4096),
            enabled: true,
        },
        1 => BitmapOp::Clear,
        2 => BitmapOp::Disable,
        _ => BitmapOp::Remove,
    };
    let name = match DRIVER.open(storage.clone(), &OpenOptions::new().read_only(true)) {
        Ok(dev) => dev
            .as_bitmaps()
            .and_then(|b| b.list().first().map(|i| i.name.clone()))
            .unwrap_or_else(|| "fz".into()),
        Err(_) => "fz".into(),
    };
    let _ = diskimg_qcow2::edit_bitmaps(storage.clone(), &name, &[op]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((op_bytes, image)) = ops::split_ops(rest) else {
        return;
    };
    let Some(storage) = ops::storage_with(image) else {
        return;
    };
    let shift = 2 * u32::from(flags >> 6);
    let storage: Arc<dyn Storage> = Arc::new(Sparse {
        inner: storage,
        shift,
    });
    if flags & 1 != 0 {
        edit_offline(&storage, flags);
    }
    let Ok(dev) = DRIVER.open(storage.clone(), &options(flags)) else {
        return;
    };
    if flags & 4 != 0 {
        let _ = dev.check(RepairMode::All);
    }
    bitmaps(dev.as_ref());
    snapshots(dev.as_ref(), flags);
    ops::run_ops(dev.as_ref(), op_bytes);
    if flags & 48 == 0 {
        if let Some(s) = dev.as_snapshots() {
            let _ = s.create("fz");
        }
    }
    let _ = dev.close();
    drop(dev);
    // A second read-write open marks the bitmaps the close stored in use again.
    if let Ok(dev) = DRIVER.open(storage.clone(), &options(flags & !4)) {
        bitmaps(dev.as_ref());
        let _ = dev.close();
    }
    diskimg_testutil::exercise_driver(&DRIVER, &ops::bytes_of(storage.as_ref()));
});
