//! The write path: cluster allocation with copy-on-write and subclusters (zero writes
//! and discards: `zero.rs`; compressed clusters: `compressed_write`; in-place
//! overwrites under the shared lock: `overwrite.rs`).
//!
//! Ordering (crash consistency): new clusters are refcounted and their data written,
//! then storage is flushed, and only then does an L2 (or L1) entry point to them (L2
//! updates are deferred to the next flush, see `Meta::defer`). When a cluster is dropped,
//! the L2 entry is rewritten and flushed before its refcount falls.
//! A crash can therefore leak clusters but never leave a dangling reference.

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{DebugEvent, Result, Storage};

use crate::device::Qcow2Device;
use crate::disk::idx;
use crate::disk::table::{L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, Sub, classify};
use crate::encryption::write_data;
use crate::engine::deferred::L2Update;
use crate::engine::meta::Meta;
use crate::engine::overlap::MetaKind;
use crate::errors::internal;
use crate::ext_alloc;

pub(crate) use crate::zero::{discard, write_zeroes};

/// All 32 subcluster allocation bits.
pub(crate) const ALL_ALLOC: u64 = 0xffff_ffff;

/// Metadata updates collected during one request, applied by [`commit`].
#[derive(Default)]
pub(crate) struct Pending {
    /// The L2 entry updates.
    pub(crate) l2: Vec<L2Update>,
    /// Host ranges to drop one reference from once the L2 updates are durable.
    pub(crate) unref: Vec<(u64, u64)>,
    /// New clusters were allocated: flush before pointing to them.
    pub(crate) flush: bool,
    /// Host clusters allocated ahead as one run for the next clusters of an extended
    /// L2 request (first offset, count; see `ext_alloc`).
    pub(crate) planned: Option<(u64, u64)>,
    /// Host ranges to hand to write-back once the metadata lock is dropped (`behind`).
    pub(crate) writeback: Vec<(u64, u64)>,
}

pub(crate) fn commit(m: &mut Meta, p: Pending) -> Result<()> {
    m.defer(p.l2, p.unref, p.flush)
}

/// The L2 table for L1 index `l1i`, allocated (or copied from a shared one) if needed.
pub(crate) fn ensure_l2(m: &mut Meta, l1i: u64) -> Result<u64> {
    let l2 = m.l2_offset(l1i)?;
    let l1e = m.l1().get(idx(l1i)).copied().unwrap_or(0);
    if l2 != 0 && l1e & OFLAG_COPIED != 0 {
        return Ok(l2);
    }
    let n = idx(m.cs() / 8);
    let table = if l2 != 0 {
        m.file().debug_event(DebugEvent::L2AllocCowRead);
        m.l2_table(l2)?.clone()
    } else {
        vec![0u64; n]
    };
    let new = m.alloc_run_for(1, Some("L2 table"))?;
    m.note_meta(MetaKind::ActiveL2, new, m.cs());
    if l2 == 0 && m.deferred_tables() {
        m.new_l2_deferred(l1i, new, table)?;
        return Ok(new);
    }
    m.file().debug_event(DebugEvent::L2AllocWrite);
    m.write_l2_table(new, table)?;
    m.file().flush()?;
    m.write_l1_entry(l1i, new | OFLAG_COPIED)?;
    if l2 != 0 {
        m.file().flush()?;
        m.unref_range(l2, m.cs())?;
    }
    Ok(new)
}

/// `n` new host clusters for guest clusters from `cstart` (data files: host = guest
/// offset), and whether they come from the reserve (see `reserve`): never written, and
/// L2 entries pointing to them wait for their refcounts to be durable.
pub(crate) fn new_clusters(m: &mut Meta, cstart: u64, n: u64) -> Result<(u64, bool)> {
    m.lazy_mark_dirty()?;
    if m.data().is_some() {
        return Ok((cstart, false));
    }
    match m.take_reserved(n) {
        Some(h) => Ok((h, true)),
        None => Ok((m.alloc_run(n)?, false)),
    }
}

/// Gives back `n` clusters from `host` that [`new_clusters`] allocated when their data
/// write failed (qemu's `qcow2_alloc_cluster_abort`): nothing points to them yet, so
/// freeing them is safe; if that fails too they only leak.
fn abort_clusters(m: &mut Meta, host: u64, n: u64) {
    if m.data().is_none() {
        let _ = m.set_refcount_run(host / m.cs(), n, 0);
    }
}

/// Whether guest cluster `cstart` of kind `kind` reads as zeroes (a zero cluster, or
/// unallocated with nothing below).
fn reads_zero(dev: &Qcow2Device, kind: Sub, cstart: u64) -> bool {
    match kind {
        Sub::Zero | Sub::ZeroAlloc(_) => true,
        Sub::Unalloc => dev.backing().is_none_or(|b| b.virtual_size() <= cstart),
        Sub::Data(_) | Sub::Compressed(..) => false,
    }
}

/// Whether the new host cluster `host` reads as zeroes where it is not written: it is
/// `reserved` (never written) or at or past the end of the image file, where the file
/// system guarantees zeroes. Never for data files (the host range may hold older bytes)
/// nor encryption (zero host bytes are not zero plaintext).
fn host_reads_zero(dev: &Qcow2Device, m: &Meta, host: u64, reserved: bool) -> Result<bool> {
    if m.data().is_some() || dev.crypt.is_some() {
        return Ok(false);
    }
    Ok(reserved || host >= m.file().len()?)
}

/// Makes the file reach `end`, the end of a new cluster only partly written: qemu
/// writes zeroes over the rest of a fresh cluster (`handle_alloc_space`), so its file
/// never ends inside a data cluster, and `qemu-img check`'s image end offset is the
/// file's length. A hole here costs nothing and reads as the zeroes qemu writes.
/// Nothing to do for a `reserved` cluster: the file was grown over the whole reserve
/// when it was taken (`engine/reserve.rs`), and it is only cut back under the
/// exclusive metadata lock this write holds.
fn cover_cluster(store: &dyn Storage, end: u64, reserved: bool) -> Result<()> {
    debug_assert!(!reserved || store.len().is_ok_and(|l| l >= end));
    if !reserved && store.len()? < end {
        store.set_len(end)?;
    }
    Ok(())
}

/// Whether new clusters need a storage flush before an L2 entry points to them: unless
/// they come from the reserve (whose refcounts the reserve makes durable first) and
/// losing their data in a crash leaves what the guest saw before (zeroes), see `reserve`.
fn needs_ordering(dev: &Qcow2Device, reserved: bool, was_zero: bool) -> bool {
    !(reserved && was_zero && dev.crypt.is_none())
}

/// The old allocation an L2 entry held, to drop once it is no longer referenced.
pub(crate) fn old_ref(m: &Meta, sub_entry: u64) -> Option<(u64, u64)> {
    if sub_entry & OFLAG_COMPRESSED != 0 {
        let x = 62 - (m.h().cluster_bits - 8);
        let off = sub_entry & ((1u64 << x) - 1);
        let sectors = ((sub_entry & !(OFLAG_COMPRESSED | OFLAG_COPIED)) >> x) + 1;
        return Some((off & !511, sectors * 512));
    }
    let off = sub_entry & L2E_OFFSET_MASK;
    (off != 0 && m.data().is_none()).then(|| (off, m.cs()))
}

pub(crate) fn write_cluster(
    dev: &Qcow2Device,
    m: &mut Meta,
    data: &[u8],
    guest: u64,
    p: &mut Pending,
) -> Result<()> {
    let cs = m.cs();
    let in_off = guest % cs;
    let cstart = guest - in_off;
    let l2 = ensure_l2(m, guest / m.h().l1_coverage())?;
    let i = (guest / cs) % m.h().l2_entries();
    let (e, bm, _) = m.l2_entry(guest)?;
    let copied = e & OFLAG_COPIED != 0;
    let store = m.data_store().clone();
    let crypt = dev.crypt.as_deref();
    if !m.h().extended_l2() {
        let kind = classify(m.h(), e, bm, 0, l2)?;
        if let Sub::Data(h) = kind
            && copied
        {
            m.check_overlap(h, cs)?;
            return write_data(crypt, store.as_ref(), data, h + in_off, guest);
        }
        let (host, reserved) = match kind {
            Sub::ZeroAlloc(h) if copied => {
                m.check_overlap(h, cs)?;
                (h, false)
            }
            _ => new_clusters(m, cstart, 1)?,
        };
        let was_zero = reads_zero(dev, kind, cstart);
        if data.len() as u64 == cs {
            write_data(crypt, store.as_ref(), data, host, cstart)?;
        } else if was_zero && host_reads_zero(dev, m, host, reserved)? {
            // The rest of the cluster reads as zeroes, and so does the host file there
            // (a hole or past its end): only the guest's bytes are written.
            write_data(crypt, store.as_ref(), data, host + in_off, guest)?;
            cover_cluster(store.as_ref(), host + cs, reserved)?;
            let done = dev.behind.wrote(cs, host + in_off, data.len() as u64);
            p.writeback.extend(done);
        } else {
            let mut full = vec![0u8; idx(cs)];
            if !matches!(kind, Sub::Zero | Sub::ZeroAlloc(_)) {
                dev.read_locked(m, &mut full, cstart)?;
            }
            full.put(idx(in_off), data);
            write_data(crypt, store.as_ref(), &full, host, cstart)?;
        }
        p.l2.push(L2Update::new(l2, i, host | OFLAG_COPIED, 0));
        p.flush |= needs_ordering(dev, reserved, was_zero);
        if !(copied && matches!(kind, Sub::ZeroAlloc(_)))
            && let Some(r) = old_ref(m, e).filter(|_| !copied || e & OFLAG_COMPRESSED != 0)
        {
            p.unref.push(r);
        }
        return Ok(());
    }
    // Extended L2: validate, then work per subcluster.
    classify(m.h(), e, bm, 0, l2)?;
    let allocated =
        e & OFLAG_COMPRESSED == 0 && (e & L2E_OFFSET_MASK != 0 || (m.data().is_some() && copied));
    if e & OFLAG_COMPRESSED != 0 || (allocated && !copied) {
        let at = L2Update::new(l2, i, e, bm);
        return ext_alloc::copy_on_write(dev, m, data, guest, at, p);
    }
    let (host, mut nbm) = if allocated {
        m.check_overlap(e & L2E_OFFSET_MASK, cs)?;
        (e & L2E_OFFSET_MASK, bm)
    } else {
        p.flush = true;
        (ext_alloc::take_planned(m, p, cstart)?, bm & !ALL_ALLOC)
    };
    let g = cs / 32;
    let end = in_off + data.len() as u64;
    // The fully covered subclusters form one contiguous run: one write.
    let full_lo = in_off.div_ceil(g) * g;
    let full_hi = end / g * g;
    if full_lo < full_hi {
        let src = data
            .get(idx(full_lo - in_off)..idx(full_hi - in_off))
            .ok_or(internal("write range"))?;
        write_data(crypt, store.as_ref(), src, host + full_lo, cstart + full_lo)?;
    }
    for sc in in_off / g..=(end - 1) / g {
        let gs = sc * g;
        let ws = gs.max(in_off);
        let we = (gs + g).min(end);
        let src = data
            .get(idx(ws - in_off)..idx(we - in_off))
            .ok_or(internal("write range"))?;
        if ws == gs && we == gs + g {
            // Written above.
        } else if (nbm >> sc) & 1 != 0 {
            write_data(crypt, store.as_ref(), src, host + ws, cstart + ws)?;
        } else {
            let mut gb = vec![0u8; idx(g)];
            if (bm >> (32 + sc)) & 1 == 0 {
                dev.read_locked(m, &mut gb, cstart + gs)?;
            }
            gb.put(idx(ws - gs), src);
            write_data(crypt, store.as_ref(), &gb, host + gs, cstart + gs)?;
        }
        nbm = (nbm | (1 << sc)) & !(1u64 << (32 + sc));
    }
    if !allocated || nbm != bm {
        p.l2.push(L2Update::new(l2, i, host | OFLAG_COPIED, nbm));
    }
    Ok(())
}

/// Whole-cluster writes over a run of clusters of one L2 table that are either all
/// overwritten in place (contiguous, COPIED) or all freshly allocated (nothing to copy):
/// one data write, one refcount update, one L2 update. Returns the bytes written, or
/// `None` when the slow path must handle `guest`.
fn fast_run(
    dev: &Qcow2Device,
    m: &mut Meta,
    buf: &[u8],
    guest: u64,
    p: &mut Pending,
) -> Result<Option<u64>> {
    let cs = m.cs();
    if m.h().extended_l2() || !guest.is_multiple_of(cs) || (buf.len() as u64) < 2 * cs {
        return Ok(None);
    }
    let per = m.h().l2_entries();
    let i0 = (guest / cs) % per;
    let max_n = (buf.len() as u64 / cs).min(per - i0);
    let l2 = ensure_l2(m, guest / m.h().l1_coverage())?;
    let mut n = 0u64;
    let mut mode: Option<bool> = None; // Some(true) = fresh, Some(false) = in place
    let mut host0 = 0u64;
    let mut olds = Vec::new();
    // Preallocated zero clusters overwritten in place: their zero flag goes.
    let mut unzero = Vec::new();
    let mut was_zero = true;
    while n < max_n {
        let (e, bm, _) = m.l2_entry(guest + n * cs)?;
        let copied = e & OFLAG_COPIED != 0;
        let kind = classify(m.h(), e, bm, 0, l2)?;
        let this = match kind {
            Sub::Data(h) | Sub::ZeroAlloc(h) if copied => {
                if n == 0 {
                    host0 = h;
                }
                if h != host0 + n * cs || mode == Some(true) {
                    break;
                }
                if matches!(kind, Sub::ZeroAlloc(_)) {
                    unzero.push(n);
                }
                false
            }
            _ => true,
        };
        if *mode.get_or_insert(this) != this {
            break;
        }
        if this {
            olds.push(e);
            was_zero &= reads_zero(dev, kind, guest + n * cs);
        }
        n += 1;
    }
    if n < 2 {
        return Ok(None);
    }
    let data = buf.get(..idx(n * cs)).ok_or(internal("write range"))?;
    let store = m.data_store().clone();
    let crypt = dev.crypt.as_deref();
    if mode == Some(false) {
        m.check_overlap(host0, n * cs)?;
        write_data(crypt, store.as_ref(), data, host0, guest)?;
        for k in unzero.into_iter().filter(|&k| k < n) {
            p.l2.push(L2Update::new(
                l2,
                i0 + k,
                (host0 + k * cs) | OFLAG_COPIED,
                0,
            ));
            p.flush = true;
        }
        return Ok(Some(n * cs));
    }
    let (host, reserved) = new_clusters(m, guest, n)?;
    if let Err(e) = write_data(crypt, store.as_ref(), data, host, guest) {
        abort_clusters(m, host, n);
        return Err(e);
    }
    for (k, e) in olds.into_iter().enumerate() {
        let k = k as u64;
        p.l2.push(L2Update::new(l2, i0 + k, (host + k * cs) | OFLAG_COPIED, 0));
        // Fresh runs never hold a COPIED allocation: whatever was there is shared.
        if let Some(r) = old_ref(m, e) {
            p.unref.push(r);
        }
    }
    p.flush |= needs_ordering(dev, reserved, was_zero);
    Ok(Some(n * cs))
}

/// `BlockDevice::write_at` for qcow2: in place under the shared lock when no metadata
/// changes (`overwrite`), else cluster by cluster under the exclusive lock.
pub(crate) fn write(dev: &Qcow2Device, buf: &[u8], off: u64) -> Result<()> {
    if crate::overwrite::overwrite_shared(dev, buf, off)? {
        return Ok(());
    }
    let mut m = dev.lock();
    let cs = m.cs();
    let mut p = Pending::default();
    let mut done = 0usize;
    let res = (|| {
        while done < buf.len() {
            let guest = off + done as u64;
            let n = idx((cs - guest % cs).min((buf.len() - done) as u64));
            let rest = buf.get(done..).unwrap_or(&[]);
            if let Some(k) = fast_run(dev, &mut m, rest, guest, &mut p)? {
                done += idx(k);
                continue;
            }
            let chunk = buf.get(done..done + n).ok_or(internal("write range"))?;
            ext_alloc::plan_run(&mut m, &mut p, guest, off + buf.len() as u64)?;
            write_cluster(dev, &mut m, chunk, guest, &mut p)?;
            done += n;
        }
        Ok(())
    })();
    // Planned clusters an error left unused go back (free).
    let dropped = ext_alloc::drop_planned(&mut m, &mut p);
    // The clusters written before a failure are linked all the same (as qemu links
    // each finished part of a request), so they do not leak.
    let writeback = std::mem::take(&mut p.writeback);
    let committed = commit(&mut m, p);
    drop(m);
    // Outside the lock: the hand-over allocates the delayed blocks and submits the I/O.
    for (lo, hi) in writeback {
        dev.file.start_writeback(lo, hi - lo);
    }
    res.and(dropped).and(committed)
}
