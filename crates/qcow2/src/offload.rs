//! `BlockDevice::write_from` for qcow2: guest bytes copied from another storage straight
//! into their host clusters with [`copy_range`] (`copy_file_range` between files, as
//! qemu-img's `convert -C`).
//!
//! Only whole clusters are offloaded: an unaligned head or tail, the partial last cluster
//! of the disk and every write to an encrypted image go through a buffer and
//! [`crate::write::write`]. A whole cluster never needs copy-on-write, so each one is
//! either overwritten in place (an allocated cluster this image owns, `COPIED`) or gets
//! a fresh cluster (unallocated, zero, compressed or shared ones, whose old reference is
//! dropped afterwards). The order is the write path's: fresh clusters are allocated and
//! refcounted, the data is copied, and the L2 entries are updated through
//! [`Meta::defer`] (after a flush).

use diskimg_blockio::{Result, Storage, copy_range, write_from_by_buffer};

use crate::device::Qcow2Device;
use crate::disk::table::{L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, Sub, classify};
use crate::engine::deferred::L2Update;
use crate::engine::meta::Meta;
use crate::write::{ALL_ALLOC, Pending, ensure_l2, old_ref};

/// What a whole-cluster write does to one guest cluster.
#[derive(Clone, Copy)]
enum Plan {
    /// Overwrite the cluster at this host offset; `Some((entry, bitmap))` when its L2
    /// entry changes (a zero flag or subcluster bits to clear).
    InPlace(u64, Option<(u64, u64)>),
    /// A new cluster (host offset filled in when allocated); the L2 bitmap to store.
    Fresh(u64, u64),
}

/// `BlockDevice::write_from` for qcow2 (range and writability already checked).
pub(crate) fn write_from(
    dev: &Qcow2Device,
    off: u64,
    len: u64,
    src: &dyn Storage,
    src_off: u64,
) -> Result<()> {
    let (cs, size) = {
        let m = dev.lock();
        (m.cs(), m.size())
    };
    let end = off + len;
    // The whole clusters inside the range (a partial last cluster of the disk is not).
    let a = off.next_multiple_of(cs).min(end);
    let b = (end / cs * cs).max(a);
    if dev.crypt.is_some() || a == b || size < b {
        return write_from_by_buffer(dev, off, len, src, src_off);
    }
    if a > off {
        write_from_by_buffer(dev, off, a - off, src, src_off)?;
    }
    whole_clusters(dev, a, b - a, src, src_off + (a - off))?;
    if end > b {
        write_from_by_buffer(dev, b, end - b, src, src_off + (b - off))?;
    }
    Ok(())
}

/// Whole, aligned clusters `guest..guest+len`, one L2 table at a time.
fn whole_clusters(
    dev: &Qcow2Device,
    guest: u64,
    len: u64,
    src: &dyn Storage,
    src_off: u64,
) -> Result<()> {
    let mut m = dev.lock();
    let cs = m.cs();
    let end = guest + len;
    let mut pos = guest;
    let mut p = Pending::default();
    while pos < end {
        let per = m.h().l2_entries();
        let i0 = (pos / cs) % per;
        let n = ((end - pos) / cs).min(per - i0);
        let l1i = pos / m.h().l1_coverage();
        let l2 = ensure_l2(&mut m, l1i)?;
        let mut plans = plan_table(&mut m, pos, n, l2, &mut p)?;
        allocate(&mut m, pos, &mut plans)?;
        // One copy per run of host-contiguous clusters.
        let store = m.data_store().clone();
        let mut k = 0usize;
        while k < plans.len() {
            let host0 = host_of(plans.get(k));
            let mut run = 1usize;
            while plans
                .get(k + run)
                .is_some_and(|q| Some(host_of(Some(q))) == host0.checked_add(run as u64 * cs))
            {
                run += 1;
            }
            let g = pos + k as u64 * cs;
            copy_range(
                src,
                src_off + (g - guest),
                store.as_ref(),
                host0,
                run as u64 * cs,
            )?;
            k += run;
        }
        for (k, plan) in plans.into_iter().enumerate() {
            let i = i0 + k as u64;
            match plan {
                Plan::InPlace(_, Some((e, bm))) => p.l2.push(L2Update::new(l2, i, e, bm)),
                Plan::InPlace(_, None) => {}
                Plan::Fresh(host, bm) => {
                    p.l2.push(L2Update::new(l2, i, host | OFLAG_COPIED, bm));
                    p.flush = true;
                }
            }
        }
        pos += n * cs;
    }
    m.defer(p.l2, p.unref, p.flush)
}

fn host_of(plan: Option<&Plan>) -> u64 {
    match plan {
        Some(Plan::InPlace(h, _) | Plan::Fresh(h, _)) => *h,
        None => 0,
    }
}

/// Decides, for `n` clusters from `pos` (all in the L2 table at `l2`), which are
/// overwritten in place and which get fresh clusters (queuing the old references of the
/// latter in `p.unref`).
fn plan_table(m: &mut Meta, pos: u64, n: u64, l2: u64, p: &mut Pending) -> Result<Vec<Plan>> {
    let cs = m.cs();
    let ext = m.h().extended_l2();
    let mut plans = Vec::new();
    for k in 0..n {
        let (e, bm, _) = m.l2_entry(pos + k * cs)?;
        let copied = e & OFLAG_COPIED != 0;
        let kind = classify(m.h(), e, bm, 0, l2)?;
        let in_place = if !ext {
            match kind {
                Sub::Data(h) if copied => Some((h, None)),
                Sub::ZeroAlloc(h) if copied => Some((h, Some((h | OFLAG_COPIED, 0)))),
                _ => None,
            }
        } else {
            let allocated = e & OFLAG_COMPRESSED == 0
                && (e & L2E_OFFSET_MASK != 0 || (m.data().is_some() && copied));
            let h = e & L2E_OFFSET_MASK;
            (allocated && copied).then_some((h, (bm != ALL_ALLOC).then_some((e, ALL_ALLOC))))
        };
        let plan = match in_place {
            Some((h, update)) => {
                m.check_overlap(h, cs)?;
                Plan::InPlace(h, update)
            }
            None => {
                if let Some(r) = old_ref(m, e) {
                    p.unref.push(r);
                }
                Plan::Fresh(0, if ext { ALL_ALLOC } else { 0 })
            }
        };
        plans.push(plan);
    }
    Ok(plans)
}

/// Gives every fresh plan its host cluster: one allocation per run of consecutive fresh
/// clusters (with a data file, host = guest offset).
fn allocate(m: &mut Meta, pos: u64, plans: &mut [Plan]) -> Result<()> {
    let cs = m.cs();
    let mut k = 0usize;
    while k < plans.len() {
        if !matches!(plans.get(k), Some(Plan::Fresh(..))) {
            k += 1;
            continue;
        }
        let mut run = 1usize;
        while matches!(plans.get(k + run), Some(Plan::Fresh(..))) {
            run += 1;
        }
        let host = if m.data().is_some() {
            pos + k as u64 * cs
        } else {
            m.alloc_run(run as u64)?
        };
        for (j, plan) in plans.iter_mut().skip(k).take(run).enumerate() {
            if let Plan::Fresh(h, _) = plan {
                *h = host + j as u64 * cs;
            }
        }
        k += run;
    }
    Ok(())
}
