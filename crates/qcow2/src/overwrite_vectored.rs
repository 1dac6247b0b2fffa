//! Vectored in-place overwrites: a scatter-gather write (a virtio-blk request's guest
//! pages) into clusters the image owns alone goes to the host file as one `pwritev(2)`
//! per host run, straight from the caller's buffers, under the shared metadata lock.
//!
//! [`BlockDevice::write_vectored_at`](diskimg_blockio::BlockDevice::write_vectored_at)'s
//! default gathers small buffers into a staging buffer first (one `write_at` instead of
//! one per 4 KiB page), which costs a copy of the whole request; qemu's qcow2 hands the
//! guest's I/O vector to the file as it is. This does the same, under exactly the
//! conditions of `overwrite.rs` (the same `plan`: every byte in place, nothing but guest
//! data written, mapping changes waiting on the lock), and only where a vectored storage
//! write is one request: a buffered host file ([`Storage::host_file`]) or any storage
//! that says so ([`Storage::writes_vectored`]: an `O_DIRECT` host file, whose aligned
//! pages go out as one `pwritev` and anything else through one aligned buffer; before,
//! the staging copy was copied once more into that buffer). A wrapper writes buffer by
//! buffer, where the staging copy is cheaper. Encrypted images keep the staging path
//! (data is enciphered in place in a buffer of its own).

use std::io::IoSlice;

use diskimg_blockio::{DebugEvent, Result, Storage, vectored::total_len};

use crate::device::Qcow2Device;
use crate::errors::internal;
use crate::overwrite::plan;

/// Writes `bufs` (consecutive guest bytes from `off`) in place when every byte lands in
/// an allocated cluster the image owns alone and the data storage is a buffered host
/// file. Returns false, having written nothing, otherwise.
pub(crate) fn overwrite_vectored(
    dev: &Qcow2Device,
    bufs: &[IoSlice<'_>],
    off: u64,
) -> Result<bool> {
    let len = total_len(bufs.iter().map(|b| b.len()), off)?;
    if len == 0 || dev.crypt.is_some() {
        return Ok(false);
    }
    let m = dev.shared();
    let store = m.data_store();
    if store.host_file().is_none() && !store.writes_vectored() {
        return Ok(false);
    }
    let Some(runs) = plan(&m, off, len)? else {
        return Ok(false);
    };
    // As in `overwrite_shared`: the lock stays held (shared) until the data is written.
    // The runs cover the request in order; `pos` is where the next one starts in
    // `bufs` (buffer index, bytes into it).
    let mut pos = (0, 0);
    for r in runs {
        let (parts, next) = parts(bufs, pos, r.len);
        if total_len(parts.iter().map(|p| p.len()), 0)? != r.len {
            return Err(internal("vectored write range"));
        }
        store.debug_event(DebugEvent::WriteAio);
        store.write_vectored_all_at(&parts, r.host)?;
        pos = next;
    }
    Ok(true)
}

/// The `len` bytes of `bufs` from `(buffer index, bytes into it)`, as slices (fewer
/// when `bufs` ends first); returns them and the position after them.
fn parts<'a>(
    bufs: &'a [IoSlice<'_>],
    (first, skip): (usize, u64),
    len: u64,
) -> (Vec<IoSlice<'a>>, (usize, u64)) {
    let mut out = Vec::new();
    let (mut i, mut skip, mut left) = (first, skip, len);
    while left > 0 {
        let Some(b) = bufs.get(i) else {
            break;
        };
        let from = usize::try_from(skip).unwrap_or(usize::MAX).min(b.len());
        let take = (b.len() - from).min(usize::try_from(left).unwrap_or(usize::MAX));
        if let Some(s) = b.get(from..from + take)
            && take > 0
        {
            out.push(IoSlice::new(s));
        }
        left -= take as u64;
        if from + take == b.len() {
            (i, skip) = (i + 1, 0);
        } else {
            skip = (from + take) as u64;
        }
    }
    (out, (i, skip))
}
