//! Zero writes and discards: zero flags on whole clusters (v3), zero subclusters
//! (extended L2), zero data where neither fits, and deallocation, split and ordered as
//! qemu's `qcow2_co_pwrite_zeroes` and `qcow2_co_pdiscard` do. The crash-consistency
//! ordering is the write path's (`write.rs`): L2 updates are deferred, and a dropped
//! cluster loses its reference only once the L2 entry no longer pointing to it is durable.

use diskimg_blockio::Result;

use crate::device::Qcow2Device;
use crate::disk::header::AUTOCLEAR_DATA_RAW;
use crate::disk::idx;
use crate::disk::table::{
    L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, Sub, classify,
};
use crate::engine::deferred::L2Update;
use crate::engine::meta::Meta;
use crate::ext_alloc;
use crate::write::{ALL_ALLOC, Pending, commit, ensure_l2, old_ref, write_cluster};

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
    // Host clusters the zero write frees (qemu's `QCOW2_DISCARD_REQUEST` frees), punched
    // once the updates are written.
    let mut punch = Vec::new();
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
                m.write_deferred()?;
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
        zero_range(dev, &mut m, &zeros, r, (unmap, &mut punch), &mut p)?;
    }
    m.punch_when_freed(&punch);
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
/// (extended L2), zero data elsewhere. `unmap`: the request may deallocate; the host
/// clusters it frees are added to `punch` (a data file's are discarded at once).
fn zero_range(
    dev: &Qcow2Device,
    m: &mut Meta,
    zeros: &[u8],
    r: std::ops::Range<u64>,
    (unmap, punch): (bool, &mut Vec<(u64, u64)>),
    p: &mut Pending,
) -> Result<()> {
    let cs = m.cs();
    let size = m.size();
    let v3 = m.h().version >= 3;
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
        if !v3 && v2_reads_zero(dev, m, pos)? {
            // As qemu: the rest of an unallocated cluster reads as zeroes without a
            // backing file, so the request grows to the whole cluster, which v2 zeroes
            // by discarding it (qcow2_co_pwrite_zeroes, qcow2_subcluster_zeroize): no
            // data cluster is allocated.
            pos += n;
            continue;
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
        let at = L2Update::new(table, index, entry, bitmap);
        let dropped = in_data_file(m, pos..pos + n, unmap, |m| {
            if ext {
                zero_subclusters(dev, m, zeros, at, pos..pos + n, unmap, p)
            } else {
                zero_cluster(m, at, unmap, p)
            }
        })?;
        if let Some(r) = dropped
            && m.data().is_none()
        {
            punch.push(r);
        }
        pos += n;
    }
    Ok(())
}

/// v2 (no zero flag): whether the cluster holding `pos` is unallocated with no backing
/// file below, so it reads as zeroes whatever part of it a zero write names.
fn v2_reads_zero(dev: &Qcow2Device, m: &mut Meta, pos: u64) -> Result<bool> {
    if dev.backing().is_some() || m.h().backing_file.is_some() {
        return Ok(false);
    }
    let (e, bm, l2o) = m.l2_entry(pos)?;
    Ok(matches!(classify(m.h(), e, bm, 0, l2o)?, Sub::Unalloc))
}

/// Changes the L2 entry of guest range `guest` with `change` (which returns the host
/// range the entry drops, see [`dropped_range`]) and keeps an external data file in
/// step, in qemu's order: a raw data file, which must read as the guest does, is zeroed
/// there first (punched with `unmap`; a discard always unmaps), whatever the entry
/// keeps, as qemu's `qcow2_subcluster_zeroize` does before it touches L2 (zeroing after
/// `change` wrote an edge piece as zero data would punch what qemu leaves allocated:
/// cli `zero_unmap.rs`). Any other data file's dropped cluster is no one else's and is
/// discarded once the entry no longer points to it (in a discard no I/O lies between
/// the two, so the order is moot there). Without a data file only `change`
/// runs (the caller frees the refcounted clusters): the raw bit alone does not make one,
/// and must not make the guest range zeroed in the image file itself (qemu refuses such
/// an image, "data-file-raw requires a data file").
fn in_data_file(
    m: &mut Meta,
    guest: std::ops::Range<u64>,
    unmap: bool,
    change: impl FnOnce(&mut Meta) -> Result<Option<(u64, u64)>>,
) -> Result<Option<(u64, u64)>> {
    let Some(store) = m.data().cloned() else {
        return change(m);
    };
    if m.h().autoclear & AUTOCLEAR_DATA_RAW != 0 {
        let (pos, n) = (guest.start, guest.end - guest.start);
        if unmap {
            store.write_zeroes_unmap(pos, n)?;
        } else {
            store.write_zeroes(pos, n)?;
        }
        return change(m);
    }
    let dropped = change(m)?;
    if let Some((h, len)) = dropped {
        store.discard(h, len)?;
    }
    Ok(dropped)
}

/// The host range entry `e` stops pointing to when it is dropped: its refcounted
/// clusters ([`old_ref`]), or its cluster in the external data file.
fn dropped_range(m: &Meta, e: u64) -> Option<(u64, u64)> {
    if m.data().is_some() {
        let allocated = e & (L2E_OFFSET_MASK | OFLAG_COPIED) != 0;
        return allocated.then(|| (e & L2E_OFFSET_MASK, m.cs()));
    }
    old_ref(m, e)
}

/// A standard cluster (entry `at`) becomes a zero cluster, as qemu's
/// `zero_in_l2_slice`: the entry keeps what it has (host offset, and the COPIED flag
/// or its absence: a cluster a snapshot shares stays shared, read as zeroes) and gains
/// the zero flag; a compressed cluster, or with `unmap` an allocated one, loses its host
/// cluster. Returns the host range it dropped (see [`dropped_range`]).
fn zero_cluster(
    m: &Meta,
    at: L2Update,
    unmap: bool,
    p: &mut Pending,
) -> Result<Option<(u64, u64)>> {
    let e = at.entry;
    let drop = match classify(m.h(), e, at.bitmap, 0, at.table)? {
        Sub::Compressed(..) => true,
        Sub::Data(_) | Sub::ZeroAlloc(_) => unmap,
        Sub::Zero | Sub::Unalloc => false,
    };
    let new = if drop { OFLAG_ZERO } else { e | OFLAG_ZERO };
    if drop && let Some(r) = old_ref(m, e) {
        p.unref.push(r);
    }
    // An entry that already says so is not written again (qemu's `zero_in_l2_slice`:
    // no L2 update, iotest 179 with a blkdebug rule on `l2_update`).
    if new != e {
        p.l2.push(L2Update::new(at.table, at.index, new, 0));
    }
    Ok(drop.then(|| dropped_range(m, e)).flatten())
}

/// Extended L2, a whole cluster (entry `at`), as qemu's `zero_in_l2_slice`: every
/// subcluster reads as zeroes; a compressed cluster, or with `unmap` an allocated one,
/// loses its host cluster (returned, see [`dropped_range`]).
fn zero_whole_ext(m: &Meta, at: L2Update, unmap: bool, p: &mut Pending) -> Option<(u64, u64)> {
    let e = at.entry;
    let drop = e & OFLAG_COMPRESSED != 0 || (unmap && e & L2E_OFFSET_MASK != 0);
    let entry = if drop { 0 } else { e };
    if drop && let Some(r) = old_ref(m, e) {
        p.unref.push(r);
    }
    if (entry, ALL_ALLOC << 32) != (e, at.bitmap) {
        p.l2.push(L2Update::new(at.table, at.index, entry, ALL_ALLOC << 32));
    }
    drop.then(|| dropped_range(m, e)).flatten()
}

/// Extended L2 (entry `at`): the whole subclusters of `r` (one cluster's part) get the
/// zero bit, the edges get zero data (a whole cluster: [`zero_whole_ext`], whose dropped
/// host range is returned).
fn zero_subclusters(
    dev: &Qcow2Device,
    m: &mut Meta,
    zeros: &[u8],
    at: L2Update,
    r: std::ops::Range<u64>,
    unmap: bool,
    p: &mut Pending,
) -> Result<Option<(u64, u64)>> {
    let cs = m.cs();
    let g = cs / 32;
    let (pos, n) = (r.start, r.end - r.start);
    let cstart = pos - pos % cs;
    let in_off = pos - cstart;
    let e = at.entry;
    // A whole cluster as qemu's block layer hands it over: an image end inside the
    // cluster counts only on a subcluster boundary (else the end is a piece of its own).
    if in_off == 0 && (n == cs || (pos + n == m.size() && m.size().is_multiple_of(g))) {
        return Ok(zero_whole_ext(m, at, unmap, p));
    }
    if e & OFLAG_COMPRESSED != 0 && !in_off.is_multiple_of(g) {
        // As qemu: the unaligned head is written as data (copying the compressed
        // cluster into a new one), then the rest zeroes subclusters of that cluster.
        let head = (g - in_off % g).min(n);
        write_cluster(dev, m, zeros.get(..idx(head)).unwrap_or(&[]), pos, p)?;
        if head == n {
            return Ok(None);
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
        return write_cluster(dev, m, z, pos, p).map(|()| None);
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
    Ok(None)
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
                in_data_file(&mut m, c..c + cs.min(size - c), true, |m| {
                    if let Some(r) = old_ref(m, e2) {
                        p.unref.push(r);
                    }
                    p.l2.push(L2Update::new(l2, i, ne, nb));
                    Ok(dropped_range(m, e2))
                })?;
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
        // Not `commit_deferred`: the reserve is not needed for the reuse
        // (`take_reserved` prefers free runs below it), and giving it back would shrink
        // and regrow the file per discard. (The stress.rs failures once blamed on a race
        // here were most likely `release_reserve` cutting guest data, fixed since.)
        m.write_deferred()?;
    }
    Ok(())
}
