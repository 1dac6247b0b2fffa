//! The refcount and COPIED-flag passes of the snapshot operations, as qemu's
//! `qcow2_update_snapshot_refcount`: every L2 table and data cluster reachable from an
//! L1 table gains or loses one reference, and the COPIED flag (spec "Cluster mapping":
//! bit 63 of L1 and standard L2 entries, "refcount is exactly one") of every entry in
//! the L2 tables visited is recomputed from the refcount after the change — in a
//! remaining snapshot's tables too, as qemu writes them.
//!
//! Setting a COPIED flag is only safe once the refcount drop that justifies it is
//! durable (a flag on a cluster still shared would let a write land in place), so a
//! decrementing pass changes no flags: the caller flushes and then runs a flags-only
//! pass ([`Flags::Tables`] with `addend == 0`). Clearing flags (an incrementing pass)
//! is always safe.

use diskimg_blockio::{Error, Result};

use crate::disk::table::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, encode_u64s,
};
use crate::engine::meta::Meta;

/// Which COPIED flags a pass rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flags {
    /// None (a decrementing pass; see the module docs).
    None,
    /// The entries of the L2 tables visited that are still in use (refcount > 0): a
    /// pass whose L1 table is being freed, or not written (qemu's decrementing passes).
    Tables,
    /// The L2 tables' entries and those of the L1 table at this offset (the active one,
    /// entry by entry, or a snapshot's, written whole as qemu writes it).
    TablesAndL1(u64),
}

/// `e` with its COPIED flag as qemu sets it for refcount `r`: set for an allocated
/// standard entry with refcount 1, cleared otherwise (compressed entries, unallocated
/// and plain zero ones included).
fn flagged(e: u64, r: u64) -> u64 {
    if r == 1 {
        e | OFLAG_COPIED
    } else {
        e & !OFLAG_COPIED
    }
}

/// Adds `addend` (+1, -1, or 0 for a flags-only pass) to the refcount of every L2 table
/// and data cluster reachable from `l1`, rewriting the COPIED flags `flags` names.
/// Clusters whose refcount drops to 0 are added to `freed` (as host ranges), to be
/// discarded once the change is durable.
pub(crate) fn update_refcounts(
    m: &mut Meta,
    l1: &[u64],
    addend: i64,
    flags: Flags,
    freed: &mut Vec<(u64, u64)>,
) -> Result<()> {
    let cs = m.cs();
    let x = 62 - (m.h().cluster_bits - 8);
    let step = if m.h().extended_l2() { 2 } else { 1 };
    let mut bump = |m: &mut Meta, c: u64| -> Result<u64> {
        if addend == 1 && !m.refblock_covers(c)? {
            return Err(uncovered(m, c));
        }
        let r = m.refcount(c)?;
        let n = match addend {
            1 => r.checked_add(1).filter(|&n| n <= m.max_refcount()),
            -1 => r.checked_sub(1),
            _ => Some(r),
        }
        .ok_or(Error::invalid("qcow2: refcount overflow"))?;
        if n != r {
            m.set_refcount(c, n)?;
            if n == 0 {
                freed.push((c * cs, cs));
            }
        }
        Ok(n)
    };
    let mut new_l1 = l1.to_vec();
    for (i, &l1e) in l1.iter().enumerate() {
        let l2 = l1e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        // A flags-only pass over a table the decrement freed has nothing to do.
        if addend == 0 && m.refcount(l2 / cs)? == 0 {
            continue;
        }
        let mut table = m.l2_table(l2)?.clone();
        let mut changed = false;
        for k in (0..table.len()).step_by(step) {
            let e = table.get(k).copied().unwrap_or(0);
            let r = if e & OFLAG_COMPRESSED != 0 {
                if addend != 0 {
                    let off = e & ((1u64 << x) - 1);
                    let sectors = ((e & !(OFLAG_COMPRESSED | OFLAG_COPIED)) >> x) + 1;
                    let start = off & !511;
                    for c in start / cs..=(start + sectors * 512 - 1) / cs {
                        bump(m, c)?;
                    }
                }
                // As qemu: compressed clusters are never modified in place.
                2
            } else {
                match e & L2E_OFFSET_MASK {
                    0 => 0,
                    off => bump(m, off / cs)?,
                }
            };
            let ne = flagged(e, r);
            if flags != Flags::None && ne != e {
                if let Some(s) = table.get_mut(k) {
                    *s = ne;
                }
                changed = true;
            }
        }
        let r = bump(m, l2 / cs)?;
        if changed && r > 0 {
            m.write_l2_table(l2, table)?;
        }
        // As qemu, which rebuilds the entry from its offset.
        let ne = flagged(l2, r);
        if let (Flags::TablesAndL1(_), Some(e)) = (flags, new_l1.get_mut(i)) {
            *e = ne;
        }
    }
    match flags {
        Flags::TablesAndL1(at) if new_l1 != l1 => write_l1(m, at, l1, &new_l1),
        _ => Ok(()),
    }
}

/// Writes the changed L1 table `new` (was `old`) at `at`: the active one entry by entry
/// (keeping the in-memory copy), a snapshot's whole and flushed, as qemu's
/// `bdrv_pwrite_sync` of the table.
fn write_l1(m: &mut Meta, at: u64, old: &[u64], new: &[u64]) -> Result<()> {
    if at == m.l1_offset() {
        for (i, (&o, &n)) in old.iter().zip(new).enumerate() {
            if o != n {
                m.write_l1_entry(i as u64, n)?;
            }
        }
        return Ok(());
    }
    m.file().write_all_at(&encode_u64s(new), at)?;
    m.file().flush()
}

/// qemu's `EFBIG` and `EAGAIN` (Linux numbers), the errors its snapshot operations
/// return for the cases below.
pub(crate) const EFBIG: i32 = 27;
const EAGAIN: i32 = 11;

/// A table entry references cluster `c`, which no refcount block covers (a corrupt
/// entry: every cluster in use has a refcount). qemu's `update_refcount` allocates a
/// refcount block for it and then fails the snapshot operation with `EAGAIN`, or with
/// `EFBIG` when the refcount table would outgrow its 8 MiB limit; so does this (without
/// allocating; increments made before stay, which only leaks).
fn uncovered(m: &Meta, c: u64) -> Error {
    let table_entries = c / m.rb_entries();
    let errno = if table_entries >= (8 << 20) / 8 {
        EFBIG
    } else {
        EAGAIN
    };
    Error::io(
        format!("updating the refcount of cluster {c}"),
        std::io::Error::from_raw_os_error(errno),
    )
}
