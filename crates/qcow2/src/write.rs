//! The write path: cluster allocation with copy-on-write, subclusters, zero flags,
//! discard (compressed clusters: `compressed_write`).
//!
//! Ordering (crash consistency): new clusters are refcounted and their data written,
//! then storage is flushed, and only then does an L2 (or L1) entry point to them (L2
//! updates are deferred to the next flush, see `Meta::defer`). When a cluster is dropped,
//! the L2 entry is rewritten and flushed before its refcount falls.
//! A crash can therefore leak clusters but never leave a dangling reference.

use diskimg_blockio::Result;
use diskimg_blockio::bytes::WriteBytes;

use crate::device::Qcow2Device;
use crate::disk::header::AUTOCLEAR_DATA_RAW;
use crate::disk::idx;
use crate::disk::table::{
    L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, Sub, classify,
};
use crate::encryption::write_data;
use crate::engine::deferred::L2Update;
use crate::engine::meta::Meta;
use crate::engine::overlap::MetaKind;
use crate::errors::internal;
use crate::ext_alloc;

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
}

fn commit(m: &mut Meta, p: Pending) -> Result<()> {
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
        m.l2_table(l2)?.clone()
    } else {
        vec![0u64; n]
    };
    let new = m.alloc_run_for(1, Some("L2 table"))?;
    m.note_meta(MetaKind::ActiveL2, new, m.cs());
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
/// offset), and whether they come from the reserve (see `reserve`): refcounts durable,
/// never written.
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

/// Whether new clusters need a storage flush before an L2 entry points to them: unless
/// they come from the durable reserve and losing their data in a crash leaves what the
/// guest saw before (zeroes), see `reserve`.
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

fn write_cluster(
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
    write_data(crypt, store.as_ref(), data, host, guest)?;
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
    ext_alloc::drop_planned(&mut m, &mut p)?;
    commit(&mut m, p)
}

/// `BlockDevice::write_zeroes` for qcow2: zero flags on whole clusters (v3), zero
/// buffers elsewhere. With extended L2 the request is split as qemu's block layer splits
/// it at subcluster alignment: an unaligned head, the aligned bulk, an unaligned tail
/// (see [`zero_pieces`]).
pub(crate) fn write_zeroes(dev: &Qcow2Device, off: u64, len: u64, unmap: bool) -> Result<()> {
    let end = off + len;
    let Some(bulk) = v2_discard_bulk(dev, off, end) else {
        return zero_pieces_of(dev, off, end, unmap);
    };
    // v2 without a backing file: whole clusters are discarded, as qemu's
    // qcow2_subcluster_zeroize does there (unallocated clusters read as zeroes).
    if off < bulk.start {
        zero_pieces_of(dev, off, bulk.start, unmap)?;
    }
    discard(dev, bulk.start, bulk.end - bulk.start)?;
    if bulk.end < end {
        zero_pieces_of(dev, bulk.end, end, unmap)?;
    }
    Ok(())
}

/// The whole clusters of `off..end` (the end of the image counting as a cluster end)
/// when the image is v2 without a backing file, which has no zero flag.
fn v2_discard_bulk(dev: &Qcow2Device, off: u64, end: u64) -> Option<std::ops::Range<u64>> {
    let has_backing = dev.backing().is_some();
    let m = dev.lock();
    if m.h().version >= 3 || has_backing || m.h().backing_file.is_some() {
        return None;
    }
    let cs = m.cs();
    let a1 = off.next_multiple_of(cs).min(end);
    let a2 = if end == m.size() { end } else { end - end % cs }.max(a1);
    (a1 < a2).then_some(a1..a2)
}

fn zero_pieces_of(dev: &Qcow2Device, off: u64, end: u64, unmap: bool) -> Result<()> {
    let len = end - off;
    let mut m = dev.lock();
    let cs = m.cs();
    let zeros = vec![0u8; idx(cs)];
    let mut p = Pending::default();
    let pieces = if m.h().version >= 3 && m.h().extended_l2() {
        zero_pieces(off, off + len, cs / 32)
    } else {
        [off..off + len, 0..0, 0..0]
    };
    for (k, r) in pieces.into_iter().enumerate() {
        if r.is_empty() {
            continue;
        }
        // Each piece sees the entries the previous one left.
        let freed = !p.unref.is_empty();
        commit(&mut m, std::mem::take(&mut p))?;
        if k == 1 && bulk_as_data(&mut m, &r)? {
            if freed {
                // As qemu, which frees what the head's copy-on-write replaced at once:
                // the bulk's allocation may reuse it (iotest 271's host offsets).
                m.commit_deferred()?;
            }
            // qemu cannot zero part of a compressed cluster: its block layer writes the
            // whole aligned bulk as zero data instead.
            let mut pos = r.start;
            while pos < r.end {
                let n = (cs - pos % cs).min(r.end - pos);
                ext_alloc::plan_run(&mut m, &mut p, pos, r.end)?;
                write_cluster(dev, &mut m, zeros.get(..idx(n)).unwrap_or(&[]), pos, &mut p)?;
                pos += n;
            }
            ext_alloc::drop_planned(&mut m, &mut p)?;
            continue;
        }
        zero_range(dev, &mut m, &zeros, r, unmap, &mut p)?;
    }
    commit(&mut m, p)
}

/// `start..end` split at subcluster alignment `g` into qemu's pieces: the unaligned head,
/// the aligned bulk, the unaligned tail (empty ranges where there is none).
fn zero_pieces(start: u64, end: u64, g: u64) -> [std::ops::Range<u64>; 3] {
    let a1 = if start.is_multiple_of(g) {
        start
    } else {
        start.next_multiple_of(g).min(end)
    };
    let a2 = (end - end % g).max(a1);
    [start..a1, a1..a2, a2..end]
}

/// Whether the aligned bulk `r` starts or ends inside a compressed cluster (after the
/// head piece was applied).
fn bulk_as_data(m: &mut Meta, r: &std::ops::Range<u64>) -> Result<bool> {
    let cs = m.cs();
    let mut edges = Vec::new();
    if !r.start.is_multiple_of(cs) {
        edges.push(r.start);
    }
    if !r.end.is_multiple_of(cs) && r.end < m.size() {
        edges.push(r.end - 1);
    }
    for g in edges {
        if m.l2_entry(g)?.0 & OFLAG_COMPRESSED != 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Zeroes `r` cluster by cluster: zero flags (v3) on whole clusters, subclusters
/// (extended L2), zero data elsewhere.
fn zero_range(
    dev: &Qcow2Device,
    m: &mut Meta,
    zeros: &[u8],
    r: std::ops::Range<u64>,
    unmap: bool,
    p: &mut Pending,
) -> Result<()> {
    let cs = m.cs();
    let size = m.size();
    let v3 = m.h().version >= 3;
    let raw = m.h().autoclear & AUTOCLEAR_DATA_RAW != 0;
    let mut pos = r.start;
    let end = r.end;
    while pos < end {
        let cstart = pos - pos % cs;
        let n = (cstart + cs).min(end) - pos;
        let mut whole = pos == cstart && (n == cs || pos + n == size);
        let ext = m.h().extended_l2();
        if v3 && !whole && !ext {
            // As qemu: a partial cluster becomes a zero cluster when the rest of it
            // already reads as zeroes (unallocated over zeroes, or a zero cluster).
            let (e, bm, l2o) = m.l2_entry(pos)?;
            let kind = classify(m.h(), e, bm, 0, l2o)?;
            whole = rest_is_zero(dev, kind, cstart..(cstart + cs).min(size), pos..pos + n)?;
        }
        if !v3 || !(whole || ext) {
            let z = zeros.get(..idx(n)).unwrap_or(&[]);
            write_cluster(dev, m, z, pos, p)?;
            pos += n;
            continue;
        }
        let l1i = pos / m.h().l1_coverage();
        let table = ensure_l2(m, l1i)?;
        let index = (pos / cs) % m.h().l2_entries();
        let (entry, bitmap, _) = m.l2_entry(pos)?;
        if raw {
            m.data_store().clone().write_zeroes(pos, n)?;
        }
        let at = L2Update::new(table, index, entry, bitmap);
        if ext {
            zero_subclusters(dev, m, zeros, at, pos..pos + n, unmap, p)?;
        } else {
            zero_cluster(m, at, unmap, p)?;
        }
        pos += n;
    }
    Ok(())
}

/// A standard cluster (entry `at`) becomes a zero cluster, keeping its host cluster
/// when it is ours and `unmap` is off.
fn zero_cluster(m: &Meta, at: L2Update, unmap: bool, p: &mut Pending) -> Result<()> {
    let e = at.entry;
    let copied = e & OFLAG_COPIED != 0;
    let keep = match classify(m.h(), e, at.bitmap, 0, at.table)? {
        Sub::Data(h) | Sub::ZeroAlloc(h) if copied && !unmap => Some(h),
        _ => None,
    };
    let new = match keep {
        Some(h) => h | OFLAG_COPIED | OFLAG_ZERO,
        None => OFLAG_ZERO,
    };
    if keep.is_none()
        && let Some(r) = old_ref(m, e)
    {
        p.unref.push(r);
    }
    p.l2.push(L2Update::new(at.table, at.index, new, 0));
    Ok(())
}

/// Extended L2, a whole cluster (entry `at`), as qemu's `zero_in_l2_slice`: every
/// subcluster reads as zeroes; a compressed cluster, or with `unmap` an allocated one,
/// loses its host cluster.
fn zero_whole_ext(m: &Meta, at: L2Update, unmap: bool, p: &mut Pending) {
    let e = at.entry;
    let drop = e & OFLAG_COMPRESSED != 0 || (unmap && e & L2E_OFFSET_MASK != 0);
    let entry = if drop { 0 } else { e };
    if drop && let Some(r) = old_ref(m, e) {
        p.unref.push(r);
    }
    p.l2.push(L2Update::new(at.table, at.index, entry, ALL_ALLOC << 32));
}

/// Extended L2 (entry `at`): the whole subclusters of `r` (one cluster's part) get the
/// zero bit, the edges get zero data (a whole cluster: [`zero_whole_ext`]).
fn zero_subclusters(
    dev: &Qcow2Device,
    m: &mut Meta,
    zeros: &[u8],
    at: L2Update,
    r: std::ops::Range<u64>,
    unmap: bool,
    p: &mut Pending,
) -> Result<()> {
    let cs = m.cs();
    let g = cs / 32;
    let (pos, n) = (r.start, r.end - r.start);
    let cstart = pos - pos % cs;
    let in_off = pos - cstart;
    let e = at.entry;
    // A whole cluster as qemu's block layer hands it over: an image end inside the
    // cluster counts only on a subcluster boundary (else the end is a piece of its own).
    if in_off == 0 && (n == cs || (pos + n == m.size() && m.size().is_multiple_of(g))) {
        zero_whole_ext(m, at, unmap, p);
        return Ok(());
    }
    if e & OFLAG_COMPRESSED != 0 && !in_off.is_multiple_of(g) {
        // As qemu: the unaligned head is written as data (copying the compressed
        // cluster into a new one), then the rest zeroes subclusters of that cluster.
        let head = (g - in_off % g).min(n);
        write_cluster(dev, m, zeros.get(..idx(head)).unwrap_or(&[]), pos, p)?;
        if head == n {
            return Ok(());
        }
        commit(m, std::mem::take(p))?;
        let (e, bm, _) = m.l2_entry(pos + head)?;
        let at = L2Update::new(at.table, at.index, e, bm);
        return zero_subclusters(dev, m, zeros, at, pos + head..r.end, unmap, p);
    }
    // As qemu's `zero_l2_subclusters`: the bits of an allocated cluster shared with a
    // snapshot change in place (only a compressed cluster cannot be partly zeroed).
    let full = if e & OFLAG_COMPRESSED != 0 {
        None
    } else {
        Some(full_subclusters(dev, m, at, pos, n)?)
    };
    let Some((first_full, last_full)) = full.filter(|(f, l)| f < l) else {
        let z = zeros.get(..idx(n)).unwrap_or(&[]);
        return write_cluster(dev, m, z, pos, p);
    };
    let head = (first_full * g).saturating_sub(in_off);
    if head > 0 {
        write_cluster(dev, m, zeros.get(..idx(head)).unwrap_or(&[]), pos, p)?;
    }
    let mut mask = 0u64;
    for sc in first_full..last_full.min(32) {
        mask |= 1 << sc;
    }
    let (e, bm, _) = m.l2_entry(pos)?;
    let pending_bm =
        p.l2.iter()
            .rev()
            .find(|x| x.table == at.table && x.index == at.index)
            .map(|x| (x.entry, x.bitmap));
    let (e, bm) = pending_bm.unwrap_or((e, bm));
    p.l2.push(L2Update::new(
        at.table,
        at.index,
        e,
        (bm & !mask) | (mask << 32),
    ));
    let tail_start = last_full * g;
    if tail_start < in_off + n {
        let t = in_off + n - tail_start;
        let z = zeros.get(..idx(t)).unwrap_or(&[]);
        // Apply the subcluster update first so the tail sees the right entry.
        commit(m, std::mem::take(p))?;
        write_cluster(dev, m, z, cstart + tail_start, p)?;
    }
    Ok(())
}

/// The subclusters `first..last` of `pos..pos+n` (inside one cluster, entry `at`) that
/// become zero subclusters: the fully covered ones, plus partial ones at the edges whose
/// rest already reads as zeroes (qemu's `qcow2_co_pwrite_zeroes`).
fn full_subclusters(
    dev: &Qcow2Device,
    m: &Meta,
    at: L2Update,
    pos: u64,
    n: u64,
) -> Result<(u64, u64)> {
    let cs = m.cs();
    let size = m.size();
    let g = cs / 32;
    let cstart = pos - pos % cs;
    let in_off = pos - cstart;
    let mut first_full = in_off.div_ceil(g);
    let mut last_full = if pos + n == size {
        (in_off + n).div_ceil(g)
    } else {
        (in_off + n) / g
    };
    let end_in = in_off + n;
    let unit = |sc: u64| cstart + sc * g..(cstart + (sc + 1) * g).min(size);
    let kind_of = |sc: u64| {
        let sc = u32::try_from(sc).unwrap_or(0);
        classify(m.h(), at.entry, at.bitmap, sc, at.table)
    };
    let head_sc = in_off / g;
    if !in_off.is_multiple_of(g) {
        let u = unit(head_sc);
        let piece = pos..(pos + n).min(u.end);
        if rest_is_zero(dev, kind_of(head_sc)?, u.clone(), piece)? {
            first_full = head_sc;
            if pos + n <= u.end {
                last_full = head_sc + 1;
            }
        }
    }
    let tail_sc = end_in / g;
    let same_as_head = !in_off.is_multiple_of(g) && head_sc == tail_sc;
    if !end_in.is_multiple_of(g) && cstart + end_in < size && !same_as_head {
        let u = unit(tail_sc);
        if rest_is_zero(dev, kind_of(tail_sc)?, u.clone(), pos.max(u.start)..pos + n)? {
            last_full = tail_sc + 1;
        }
    }
    Ok((first_full, last_full))
}

/// Whether the parts of the (sub)cluster `unit` outside `piece` read as zeroes, given
/// the (sub)cluster's `kind`: always for zero clusters, for unallocated ones when the
/// backing chain reports zeroes there (block status, as qemu's `is_zero`), never for
/// data.
fn rest_is_zero(
    dev: &Qcow2Device,
    kind: Sub,
    unit: std::ops::Range<u64>,
    piece: std::ops::Range<u64>,
) -> Result<bool> {
    Ok(match kind {
        Sub::Zero | Sub::ZeroAlloc(_) => true,
        Sub::Unalloc => {
            backing_zero(dev, unit.start, piece.start)? && backing_zero(dev, piece.end, unit.end)?
        }
        Sub::Data(_) | Sub::Compressed(..) => false,
    })
}

/// Whether guest bytes `from..to` of the backing chain are known zeroes (nothing
/// allocated, or zero clusters, or past the backing device's end).
fn backing_zero(dev: &Qcow2Device, from: u64, to: u64) -> Result<bool> {
    let Some(b) = dev.backing() else {
        return Ok(true);
    };
    let end = to.min(b.virtual_size());
    let mut pos = from;
    while pos < end {
        let e = diskimg_blockio::block_status(b.as_ref(), pos, end - pos)?;
        if e.present && !e.zero {
            return Ok(false);
        }
        pos += e.length.max(1);
    }
    Ok(true)
}

/// `BlockDevice::discard` for qcow2: whole clusters only (as qemu), reading back as
/// zeroes on v3; on v2 the clusters are deallocated, or nothing happens with a backing
/// image (as qemu, which cannot express zeroes there).
pub(crate) fn discard(dev: &Qcow2Device, off: u64, len: u64) -> Result<()> {
    let has_backing = dev.backing().is_some() || dev.lock().h().backing_file.is_some();
    let mut m = dev.lock();
    let cs = m.cs();
    let size = m.size();
    let v3 = m.h().version >= 3;
    let raw = m.h().autoclear & AUTOCLEAR_DATA_RAW != 0;
    if !v3 && has_backing {
        // qemu cannot make the range read as zeroes without data writes here, and
        // exposing the backing data would change the guest view: it ignores the request.
        return Ok(());
    }
    let mut p = Pending::default();
    let mut c = off.div_ceil(cs) * cs;
    let end = off + len;
    while c < end && (c + cs <= end || end == size) {
        let l1i = c / m.h().l1_coverage();
        let i = (c / cs) % m.h().l2_entries();
        let (e, bm, l2) = m.l2_entry(c)?;
        if l2 == 0 && !(v3 && has_backing) {
            c += cs;
            continue;
        }
        let allocated = e & OFLAG_COMPRESSED != 0
            || e & L2E_OFFSET_MASK != 0
            || (m.data().is_some() && e & OFLAG_COPIED != 0);
        if has_backing || allocated {
            let (ne, nb) = if !v3 {
                (0, 0)
            } else if m.h().extended_l2() {
                (0, ALL_ALLOC << 32)
            } else {
                (OFLAG_ZERO, 0)
            };
            if (ne, nb) != (e, bm) {
                let l2 = ensure_l2(&mut m, l1i)?;
                let (e2, _, _) = m.l2_entry(c)?;
                if let Some(r) = old_ref(&m, e2) {
                    p.unref.push(r);
                }
                if raw {
                    let n = cs.min(size - c);
                    m.data_store().clone().write_zeroes(c, n)?;
                }
                p.l2.push(L2Update::new(l2, i, ne, nb));
            }
        }
        c += cs;
    }
    // As qemu, whose freed clusters are free at once: the updates are written now and
    // the clusters unreferenced (and punched), so the next allocation can reuse them
    // (iotest 250's layout). Discards that free nothing stay deferred.
    let frees = !p.unref.is_empty();
    m.punch_when_freed(&p.unref);
    commit(&mut m, p)?;
    if frees {
        m.commit_deferred()?;
    }
    Ok(())
}
