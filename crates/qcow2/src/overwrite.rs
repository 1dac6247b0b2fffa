//! In-place overwrites under the shared metadata lock (issues 17, 20, 21).
//!
//! A guest write that lands entirely in data clusters the image already owns alone
//! (allocated, the COPIED flag set: refcount 1; with extended L2 only subclusters whose
//! allocation bit is set) changes no metadata: its bytes go to the host clusters the L2
//! entries name, as qemu's `qcow2_co_pwritev_task` does after it dropped its lock. Such
//! writes resolve their mapping and write their data holding the lock *shared*
//! ([`Qcow2Device::shared`]), so writes from several threads or queue slots to one image
//! run at once. Everything that changes a mapping or frees a cluster (allocating writes,
//! copy-on-write, zero flags, discards, snapshots, resize, amend, check, close) takes the
//! lock exclusively and so waits until the overwrites in flight are done: a host cluster
//! is never freed or reused under one of them.
//!
//! Anything else falls back whole to the exclusive path (`write.rs`): an L2 table not in
//! the cache or shared with a snapshot (no COPIED flag on its L1 entry), an unallocated,
//! zero, compressed or shared cluster anywhere in the request, an unallocated or zero
//! subcluster, a host range the overlap check refuses (the exclusive path marks the
//! image corrupt and fails the write, as before), an encrypted write that does not
//! cover whole sectors (encryption merges partial sectors, a read-modify-write that
//! concurrent writers must not interleave), or a corruption already signalled. Crash
//! consistency is unchanged: nothing but guest data is written here, exactly where the
//! exclusive path wrote it in place.

use diskimg_blockio::Result;

use crate::device::Qcow2Device;
use crate::disk::idx;
use crate::disk::table::{OFLAG_COMPRESSED, OFLAG_COPIED, Sub, classify};
use crate::encryption::write_data;
use crate::engine::meta::{Cached, Meta};
use crate::errors::internal;

/// Encrypted data is enciphered in sectors of this many bytes.
const CRYPT_SECTOR: u64 = 512;

/// One host write of a planned overwrite: `len` guest bytes from `guest` go to `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) guest: u64,
    pub(crate) host: u64,
    pub(crate) len: u64,
}

/// Writes `buf` at guest `off` in place under the shared lock when every byte lands in
/// an allocated cluster (subcluster) the image owns alone. Returns false, having written
/// nothing, when the request needs the exclusive path.
pub(crate) fn overwrite_shared(dev: &Qcow2Device, buf: &[u8], off: u64) -> Result<bool> {
    let len = buf.len() as u64;
    if len == 0 {
        return Ok(false);
    }
    if dev.crypt.is_some()
        && !(off.is_multiple_of(CRYPT_SECTOR) && len.is_multiple_of(CRYPT_SECTOR))
    {
        return Ok(false);
    }
    let m = dev.shared();
    let Some(runs) = plan(&m, off, len)? else {
        return Ok(false);
    };
    // The lock stays held (shared) until the data is written: whatever would change
    // these mappings waits for it.
    let store = m.data_store();
    let crypt = dev.crypt.as_deref();
    for r in runs {
        let at = idx(r.guest - off);
        let src = buf
            .get(at..at.saturating_add(idx(r.len)))
            .ok_or(internal("write range"))?;
        write_data(crypt, store.as_ref(), src, r.host, r.guest)?;
    }
    Ok(true)
}

/// The host runs `off..off+len` is written to in place (neighbouring clusters with
/// contiguous host offsets merged into one run), or `None` when any part of it needs
/// the exclusive path (see the module docs). Answers from the L2 cache alone.
pub(crate) fn plan(m: &Meta, off: u64, len: u64) -> Result<Option<Vec<Run>>> {
    if m.corruption_signalled() {
        return Ok(None);
    }
    let cs = m.cs();
    let end = off.checked_add(len).ok_or(internal("write range"))?;
    let mut runs: Vec<Run> = Vec::new();
    let mut pos = off;
    while pos < end {
        let n = (cs - pos % cs).min(end - pos);
        let Some(host) = in_place_host(m, pos, n)? else {
            return Ok(None);
        };
        match runs.last_mut() {
            Some(r) if r.host + r.len == host && r.guest + r.len == pos => r.len += n,
            _ => runs.push(Run {
                guest: pos,
                host,
                len: n,
            }),
        }
        pos += n;
    }
    Ok(Some(runs))
}

/// The host offset of guest `pos` when `pos..pos+n` (inside one cluster) can be
/// overwritten in place without touching metadata, else `None`.
fn in_place_host(m: &Meta, pos: u64, n: u64) -> Result<Option<u64>> {
    let cs = m.cs();
    let l1i = pos / m.h().l1_coverage();
    // A shared L2 table would be copied first (`ensure_l2`).
    let l1e = m.l1().get(idx(l1i)).copied().unwrap_or(0);
    if l1e & OFLAG_COPIED == 0 {
        return Ok(None);
    }
    let (e, bm, l2) = match m.l2_entry_cached(pos)? {
        Cached::Hit(v) => v,
        Cached::Miss(_) => return Ok(None),
    };
    if l2 == 0 || e & OFLAG_COMPRESSED != 0 || e & OFLAG_COPIED == 0 {
        return Ok(None);
    }
    let in_off = pos % cs;
    // Standard entries: one kind for the cluster; extended L2: every subcluster written
    // must be allocated (an invalid entry is left to the exclusive path to report).
    let (first, last, g) = if m.h().extended_l2() {
        let g = cs / 32;
        (in_off / g, (in_off + n - 1) / g, g)
    } else {
        (0, 0, 0)
    };
    let mut host = None;
    for sc in first..=last {
        let sc32 = u32::try_from(sc).map_err(|_| internal("subcluster index"))?;
        match classify(m.h(), e, bm, sc32, l2) {
            // The cluster's host offset (a subcluster's is `sc * g` into it).
            Ok(Sub::Data(h)) => host = Some(h - sc * g),
            _ => return Ok(None),
        }
    }
    let Some(host) = host else {
        return Ok(None);
    };
    // qemu's pre-write overlap check, over the whole cluster as the exclusive path
    // checks it; a hit is the exclusive path's to report.
    if m.overlaps_metadata(host, cs) {
        return Ok(None);
    }
    Ok(Some(host + in_off))
}
