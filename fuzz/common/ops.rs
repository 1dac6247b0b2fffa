//! The guest operations the read-write targets (`write_ops`, `qcow2_rw`) decode from their
//! input: 12 bytes each, `[kind][fill byte][offset: u32 LE, in 512-byte units][length: u32
//! LE][sub-sector shift: u16 LE]`. Offsets wrap into the disk and lengths are capped, so
//! every op reaches the format's code instead of failing the range check.

use diskimg_blockio::{BlockDevice, MemStorage, Storage, ZeroFlags};

/// Bytes per encoded op.
pub const OP_LEN: usize = 12;
/// The image may grow to this many bytes through writes (metadata allocations at hostile
/// offsets fail instead of exhausting memory).
pub const MAX_STORAGE: u64 = 64 << 20;
/// Longest single write or zeroing request.
const MAX_OP_LEN: u64 = 256 << 10;

/// Splits `[op count N][N ops][rest]`, or `None` when the input is shorter.
pub fn split_ops(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (nops, rest) = data.split_first()?;
    rest.split_at_checked(usize::from(*nops) * OP_LEN)
}

/// A memory storage holding `image`, growable to [`MAX_STORAGE`].
pub fn storage_with(image: &[u8]) -> Option<MemStorage> {
    let storage = MemStorage::with_max_len(MAX_STORAGE);
    storage.write_all_at(image, 0).ok()?;
    Some(storage)
}

/// Everything `storage` holds (at most [`MAX_STORAGE`] bytes).
pub fn bytes_of(storage: &dyn Storage) -> Vec<u8> {
    let len = storage.len().unwrap_or(0).min(MAX_STORAGE) as usize;
    let mut v = vec![0u8; len];
    let _ = storage.read_exact_at(&mut v, 0);
    v
}

/// Runs every op of `ops` on `dev`, ignoring errors.
pub fn run_ops(dev: &dyn BlockDevice, ops: &[u8]) {
    let mut buf = Vec::new();
    for op in ops.chunks_exact(OP_LEN) {
        run_op(dev, op, &mut buf);
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
