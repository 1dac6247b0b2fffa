//! Opens arbitrary bytes read-write as one of the writable formats, then runs a fuzzed
//! sequence of write / write_zeroes / discard / read / map / flush on it, and finally
//! maps, reads and checks the result: writes on hostile images must not panic, hang or
//! allocate without bound either.
//!
//! Input layout: `[format selector][op count N][N ops of 12 bytes][image bytes…]`; an op is
//! `[kind][fill byte][offset: u32 LE, in 512-byte units][length: u32 LE][sub-sector shift: u16 LE]`.
#![no_main]
use diskimg_blockio::{BlockDevice, Driver, MemStorage, OpenOptions, Storage, ZeroFlags};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// The image may grow to this many bytes through writes (metadata allocations at hostile
/// offsets fail instead of exhausting memory).
const MAX_STORAGE: u64 = 64 << 20;
/// Longest single write or zeroing request.
const MAX_OP_LEN: u64 = 256 << 10;

fn driver(sel: u8) -> &'static dyn Driver {
    match sel % 5 {
        0 => &diskimg_qcow2::DRIVER,
        1 => &diskimg_vmdk::DRIVER,
        2 => &diskimg_vdi::DRIVER,
        3 => &diskimg_vhdx::DRIVER,
        _ => &diskimg_vhd::DRIVER,
    }
}

fn run_op(dev: &dyn BlockDevice, op: &[u8], buf: &mut Vec<u8>) {
    let size = dev.virtual_size();
    if size == 0 {
        return;
    }
    let kind = op[0];
    let fill = op[1];
    let sector = u64::from(u32::from_le_bytes([op[2], op[3], op[4], op[5]]));
    let raw_len = u64::from(u32::from_le_bytes([op[6], op[7], op[8], op[9]]));
    let shift = u64::from(u16::from_le_bytes([op[10], op[11]])) % 512;
    let offset = (sector.wrapping_mul(512).wrapping_add(shift)) % size;
    let len = (raw_len % MAX_OP_LEN + 1).min(size - offset);
    buf.clear();
    buf.resize(len as usize, fill);
    let _ = match kind % 8 {
        0 | 1 => dev.write_at(buf, offset),
        2 => dev.write_zeroes(offset, len, ZeroFlags { may_unmap: false }),
        3 => dev.write_zeroes(offset, len, ZeroFlags { may_unmap: true }),
        4 => dev.discard(offset, len),
        5 => dev.read_at(buf, offset),
        6 => dev.map(offset, len).map(|_| ()),
        _ => dev.flush(),
    };
}

fuzz_target!(|data: &[u8]| {
    let [sel, nops, rest @ ..] = data else {
        return;
    };
    let ops_len = usize::from(*nops) * 12;
    let Some((ops, image)) = rest.split_at_checked(ops_len) else {
        return;
    };
    let storage = MemStorage::with_max_len(MAX_STORAGE);
    if storage.write_all_at(image, 0).is_err() {
        return;
    }
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let Ok(dev) = driver(*sel).open(storage.clone(), &OpenOptions::new()) else {
        return;
    };
    let mut buf = Vec::new();
    for op in ops.chunks_exact(12) {
        run_op(dev.as_ref(), op, &mut buf);
    }
    let _ = dev.flush();
    drop(dev);
    // Whatever the writes left behind must still open (or fail) without panicking.
    let bytes = {
        let len = storage.len().unwrap_or(0).min(MAX_STORAGE) as usize;
        let mut v = vec![0u8; len];
        let _ = storage.read_exact_at(&mut v, 0);
        v
    };
    diskimg_testutil::exercise_driver(driver(*sel), &bytes);
});
