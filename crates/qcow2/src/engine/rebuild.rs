//! Rebuilding the refcount structures from the references `check` counted, as qemu's
//! `rebuild_refcount_structure` does when a referenced cluster has refcount 0 (the
//! on-disk refcounts cannot be trusted, e.g. a refcount block is missing).
//!
//! New refcount blocks and the new refcount table go to free clusters (first fit, the
//! old structures stay in use until the switch), are written and flushed, and only then
//! does one 12-byte header write point at them. The old structures become leaks that
//! the following leak repair frees. A crash before the header write leaves the old
//! (still broken) structures in place.

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{Error, Result};

use crate::disk::idx;
use crate::disk::table::encode_u64s;
use crate::engine::meta::Meta;
use crate::engine::overlap::MetaKind;
use crate::engine::refcount::{max_refcount_of, set_entry};
use crate::errors::internal;

/// First-fit run of `n` clusters with no references in `refs` (extended as needed);
/// marks them used.
fn alloc(refs: &mut Vec<u64>, n: u64, limit: u64) -> Result<u64> {
    let mut start = 0u64;
    loop {
        let end = start
            .checked_add(n)
            .filter(|&e| e <= limit)
            .ok_or(Error::invalid(
                "qcow2: no space to rebuild the refcount structures",
            ))?;
        match (start..end).find(|&c| refs.get(idx(c)).is_some_and(|&r| r != 0)) {
            Some(used) => start = used + 1,
            None => {
                if refs.len() < idx(end) {
                    refs.resize(idx(end), 0);
                }
                for c in start..end {
                    if let Some(r) = refs.get_mut(idx(c)) {
                        *r = 1;
                    }
                }
                return Ok(start);
            }
        }
    }
}

/// Writes fresh refcount structures holding `refs` (index = host cluster) and switches
/// the header to them.
pub(crate) fn rebuild(m: &mut Meta, refs: &mut Vec<u64>) -> Result<()> {
    let order = m.h.refcount_order;
    rebuild_with_order(m, refs, order)
}

/// [`rebuild`] with entries of `2^order` bits: the refcount table offset and size and
/// the refcount order change in one header write (bytes 48–99, one sector).
pub(crate) fn rebuild_with_order(m: &mut Meta, refs: &mut Vec<u64>, order: u32) -> Result<()> {
    let cs = m.cs();
    let rbe = cs * 8 / (1u64 << order.min(6));
    let maxr = max_refcount_of(order);
    // Bounded by qemu's maximum refcount table (8 MiB) worth of refcount blocks.
    let limit = (8u64 << 20) / 8 * rbe;
    let mut blocks: Vec<u64> = Vec::new();
    let mut table: Option<(u64, u64)> = None;
    for _ in 0..64 {
        // A refcount block for every range holding a nonzero refcount.
        let mut ti = 0u64;
        while ti * rbe < refs.len() as u64 {
            if blocks.len() <= idx(ti) {
                blocks.resize(idx(ti) + 1, 0);
            }
            let lo = idx(ti * rbe);
            let hi = idx(((ti + 1) * rbe).min(refs.len() as u64));
            let used = refs.get(lo..hi).is_some_and(|s| s.iter().any(|&r| r != 0));
            if used && blocks.get(idx(ti)).copied() == Some(0) {
                let b = alloc(refs, 1, limit)?;
                if let Some(s) = blocks.get_mut(idx(ti)) {
                    *s = b * cs;
                }
            }
            ti += 1;
        }
        let need = (blocks.len() as u64 * 8).div_ceil(cs).max(1);
        match table {
            Some((_, n)) if n >= need => break,
            Some((t, n)) => {
                // Too small after all: give it back and take a larger run.
                for c in t..t + n {
                    if let Some(r) = refs.get_mut(idx(c)) {
                        *r = 0;
                    }
                }
                table = Some((alloc(refs, need, limit)?, need));
            }
            None => table = Some((alloc(refs, need, limit)?, need)),
        }
    }
    let (t, n) = table.ok_or(internal("qcow2: refcount rebuild did not converge"))?;
    // The table may have needed refcount blocks of its own: checked by the loop above
    // only if it ran again, so verify every used range has a block.
    for (ti, &b) in blocks.iter().enumerate() {
        let lo = ti * idx(rbe);
        let hi = (lo + idx(rbe)).min(refs.len());
        let used = refs.get(lo..hi).is_some_and(|s| s.iter().any(|&r| r != 0));
        if used && b == 0 {
            return Err(internal("qcow2: refcount rebuild did not converge"));
        }
    }
    if (blocks.len() as u64 * 8) > n * cs {
        return Err(internal("qcow2: refcount rebuild did not converge"));
    }
    for (ti, &b) in blocks.iter().enumerate() {
        if b == 0 {
            continue;
        }
        let mut buf = m.limits.alloc("refcount block", cs)?;
        for i in 0..rbe {
            let v = refs.get(ti * idx(rbe) + idx(i)).copied().unwrap_or(0);
            if v != 0 {
                set_entry(&mut buf, i, order, v.min(maxr));
            }
        }
        m.file.write_all_at(&buf, b)?;
    }
    let mut entries = vec![0u64; idx(n * cs / 8)];
    for (e, &b) in entries.iter_mut().zip(blocks.iter()) {
        *e = b;
    }
    m.file.write_all_at(&encode_u64s(&entries), t * cs)?;
    m.file.flush()?;
    let clusters = u32::try_from(n).unwrap_or(u32::MAX);
    if order == m.h.refcount_order {
        let mut hdr = [0u8; 12];
        hdr.put_be_u64(0, t * cs);
        hdr.put_be_u32(8, clusters);
        m.file.write_all_at(&hdr, 48)?;
    } else {
        // Version 3 header fields 48..100, rewritten with their current values but for
        // the refcount table and order.
        let mut hdr = [0u8; 52];
        hdr.put_be_u64(0, t * cs);
        hdr.put_be_u32(8, clusters);
        hdr.put_be_u32(12, m.h.nb_snapshots);
        hdr.put_be_u64(16, m.h.snapshots_offset);
        hdr.put_be_u64(24, m.h.incompatible);
        hdr.put_be_u64(32, m.h.compatible);
        hdr.put_be_u64(40, m.h.autoclear);
        hdr.put_be_u32(48, order);
        m.file.write_all_at(&hdr, 48)?;
    }
    m.file.flush()?;
    m.h.refcount_table_offset = t * cs;
    m.h.refcount_table_clusters = clusters;
    m.h.refcount_order = order;
    m.reftable = entries;
    m.rb.clear();
    // Clusters the old structures counted but nothing references are free from now on.
    m.epoch.bump();
    m.free_hint = 0;
    m.alloc_floor = 0;
    m.overlap.clear();
    m.collect_meta();
    let (so, sl) = (m.h.snapshots_offset, m.snapshot_table_len);
    m.note_meta(MetaKind::SnapshotTable, so, sl);
    let snaps: Vec<(u64, u64)> = m
        .snapshots
        .iter()
        .map(|s| (s.l1_offset, u64::from(s.l1_size) * 8))
        .collect();
    for (o, l) in snaps {
        m.note_meta(MetaKind::InactiveL1, o, l);
    }
    Ok(())
}

/// Changes the refcount width to `2^order` bits (qemu's `qcow2_change_refcount_order`):
/// the current refcounts are read, checked against the new maximum, written into new
/// structures (see [`rebuild_with_order`]), and the old table and blocks are freed.
/// `on_refs` sees the refcounts (index = host cluster) before anything changes (amend's
/// progress reports are derived from them).
pub(crate) fn change_order(
    m: &mut Meta,
    order: u32,
    on_refs: &mut dyn FnMut(&Meta, &[u64]),
) -> Result<()> {
    if order == m.h.refcount_order {
        return Ok(());
    }
    let cs = m.cs();
    let bits = 1u64 << order.min(6);
    let maxr = max_refcount_of(order);
    let end = m.file.len()?.div_ceil(cs);
    let mut refs: Vec<u64> = m.limits.alloc_elems("refcounts", end, 8)?;
    for (c, r) in refs.iter_mut().enumerate() {
        *r = m.refcount(c as u64)?;
        if *r > maxr {
            return Err(Error::invalid(format!(
                "Cannot decrease refcount entry width to {bits} bits: Cluster at offset \
                 {:#x} has a refcount of {r}",
                c as u64 * cs
            )));
        }
    }
    on_refs(m, &refs);
    let old_table = (
        m.h.refcount_table_offset,
        u64::from(m.h.refcount_table_clusters),
    );
    let old_blocks: Vec<u64> = m
        .reftable
        .iter()
        .map(|e| e & crate::disk::table::REFT_OFFSET_MASK)
        .filter(|&b| b != 0)
        .collect();
    rebuild_with_order(m, &mut refs, order)?;
    // The old structures were counted (refcount 1 each) and are now unreferenced.
    for b in old_blocks {
        m.set_refcount(b / cs, 0)?;
    }
    for k in 0..old_table.1 {
        m.set_refcount(old_table.0 / cs + k, 0)?;
    }
    m.file.flush()
}
