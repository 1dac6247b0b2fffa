//! Extended-L2 allocations as qemu's `handle_alloc` makes them: the consecutive
//! clusters of one request that need new host clusters get one contiguous run
//! ([`plan_run`], iotest 271's host offsets), and the copy-on-write of an allocated
//! cluster shared with a snapshot copies only the subclusters qemu's
//! `calculate_l2_meta` copies ([`cow_span`]): from the first allocated subcluster (or the
//! write) to the last one, keeping the rest of the bitmap.

use diskimg_blockio::Result;
use diskimg_blockio::bytes::WriteBytes;

use crate::device::Qcow2Device;
use crate::disk::idx;
use crate::disk::table::{L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::encryption::write_data;
use crate::engine::deferred::L2Update;
use crate::engine::meta::Meta;
use crate::write::{ALL_ALLOC, Pending, ensure_l2, new_clusters, old_ref};

/// Whether an extended L2 entry needs a new host cluster for a write (qemu's
/// `cluster_needs_new_alloc`): unallocated, compressed, or shared (no COPIED flag).
fn needs_new(e: u64) -> bool {
    e & OFLAG_COMPRESSED != 0 || e & L2E_OFFSET_MASK == 0 || e & OFLAG_COPIED == 0
}

/// Before the cluster-by-cluster write of guest `guest..end` reaches `guest`: when no
/// run is planned and the clusters from `guest` on (within one L2 table and the request)
/// need new host clusters, two or more of them, allocates one contiguous run for them
/// (the L2 table first, as qemu). [`take_planned`] hands its clusters out in order.
pub(crate) fn plan_run(m: &mut Meta, p: &mut Pending, guest: u64, end: u64) -> Result<()> {
    if !m.h().extended_l2() || m.data().is_some() || p.planned.is_some() || end <= guest {
        return Ok(());
    }
    let cs = m.cs();
    let per = m.h().l2_entries();
    let first = guest / cs;
    let last = (end - 1) / cs;
    let table_end = (first / per + 1) * per;
    let mut n = 0;
    while first + n <= last && first + n < table_end {
        let (e, _, _) = m.l2_entry((first + n) * cs)?;
        if !needs_new(e) {
            break;
        }
        n += 1;
    }
    if n < 2 {
        return Ok(());
    }
    ensure_l2(m, guest / m.h().l1_coverage())?;
    let (host, _) = new_clusters(m, first * cs, n)?;
    p.planned = Some((host, n));
    p.flush = true;
    Ok(())
}

/// The next cluster of the planned run, or a new one (`cstart` is the guest cluster).
pub(crate) fn take_planned(m: &mut Meta, p: &mut Pending, cstart: u64) -> Result<u64> {
    match p.planned {
        Some((host, n)) => {
            p.planned = (n > 1).then(|| (host + m.cs(), n - 1));
            Ok(host)
        }
        None => Ok(new_clusters(m, cstart, 1)?.0),
    }
}

/// Gives back planned clusters a request did not use (an error stopped it): their
/// refcounts return to 0.
pub(crate) fn drop_planned(m: &mut Meta, p: &mut Pending) -> Result<()> {
    if let Some((host, n)) = p.planned.take() {
        let cs = m.cs();
        m.set_refcount_run(host / cs, n, 0)?;
    }
    Ok(())
}

/// Writes `data` at guest `guest` into the compressed or shared extended-L2 cluster of
/// entry `at` through a new host cluster: qemu's copy-on-write span (a compressed
/// cluster whole, a shared one from its first allocated subcluster, or the write, to its
/// last) is copied with the data, the rest of the bitmap is kept.
pub(crate) fn copy_on_write(
    dev: &Qcow2Device,
    m: &mut Meta,
    data: &[u8],
    guest: u64,
    at: L2Update,
    p: &mut Pending,
) -> Result<()> {
    let cs = m.cs();
    let in_off = guest % cs;
    let cstart = guest - in_off;
    let (e, bm) = (at.entry, at.bitmap);
    let (from, to, nbm) = if e & OFLAG_COMPRESSED != 0 {
        (0, cs, ALL_ALLOC)
    } else {
        let g = cs / 32;
        let (f, t) = cow_span(bm, in_off, in_off + data.len() as u64, g);
        (f, t, bitmap_after(bm, f, t, g))
    };
    let mut b = vec![0u8; idx(to - from)];
    dev.read_locked(m, &mut b, cstart + from)?;
    b.put(idx(in_off - from), data);
    let host = take_planned(m, p, cstart)?;
    let store = m.data_store().clone();
    write_data(
        dev.crypt.as_deref(),
        store.as_ref(),
        &b,
        host + from,
        cstart + from,
    )?;
    p.l2.push(L2Update::new(at.table, at.index, host | OFLAG_COPIED, nbm));
    p.flush = true;
    if let Some(r) = old_ref(m, e) {
        p.unref.push(r);
    }
    Ok(())
}

/// qemu's copy-on-write span (byte offsets in the cluster) for a write of
/// `in_off..end` into an allocated, shared cluster with subcluster bitmap `bm`:
/// leading and trailing subclusters that are not allocated are skipped.
pub(crate) fn cow_span(bm: u64, in_off: u64, end: u64, g: u64) -> (u64, u64) {
    let alloc = u32::try_from(bm & 0xffff_ffff).unwrap_or(0);
    let first_sc = in_off / g;
    let last_sc = (end - 1) / g;
    let from = first_sc.min(u64::from(alloc.trailing_zeros()));
    let skip_tail = (31 - last_sc).min(u64::from(alloc.leading_zeros()));
    (from * g, (32 - skip_tail) * g)
}

/// The bitmap after a write of span `from..to` (subcluster multiples): allocated there,
/// not zero there, the rest as before (qemu's `qcow2_alloc_cluster_link_l2`).
pub(crate) fn bitmap_after(bm: u64, from: u64, to: u64, g: u64) -> u64 {
    let mut mask = 0u64;
    for sc in from / g..to.div_ceil(g).min(32) {
        mask |= 1 << sc;
    }
    (bm | mask) & !(mask << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cow_spans_as_qemu() {
        let g = 2048;
        // Allocated 13 and 18, write into 15: copy 13..=18.
        let bm = (1 << 13) | (1 << 18) | (1 << (32 + 7));
        assert_eq!(cow_span(bm, 15 * g, 15 * g + 1024, g), (13 * g, 19 * g));
        // Write at 10 (before the first allocated): from the write.
        assert_eq!(cow_span(bm, 10 * g, 10 * g + 1024, g), (10 * g, 19 * g));
        // Write at 20 (after the last): up to the write's subcluster.
        assert_eq!(cow_span(bm, 20 * g, 20 * g + 1024, g), (13 * g, 21 * g));
        // Nothing allocated: only the written subclusters.
        assert_eq!(cow_span(0, 3 * g + 5, 4 * g + 1, g), (3 * g, 5 * g));
        let b = bitmap_after(bm, 13 * g, 19 * g, g);
        assert_eq!(b, 0x0000_0080_0007_e000);
    }
}
