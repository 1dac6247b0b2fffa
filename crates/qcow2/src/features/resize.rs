//! Resizing (grow with optional preallocation, shrink) and create-time preallocation.

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{DebugEvent, Error, Preallocation, Result};

use crate::device::Qcow2Device;
use crate::disk::header::{AUTOCLEAR_DATA_RAW, MAX_L1_BYTES};
use crate::disk::idx;
use crate::disk::table::{L1E_OFFSET_MASK, OFLAG_COPIED, encode_u64s};
use crate::engine::deferred::L2Update;
use crate::engine::meta::Meta;
use crate::engine::overlap::MetaKind;
use crate::write::{ALL_ALLOC, Pending, ensure_l2, old_ref, write_zeroes};

/// `BlockDevice::resize` for qcow2: grow (zeroing the new area over a backing image) or
/// shrink (freeing clusters beyond the new end).
pub(crate) fn resize(
    dev: &Qcow2Device,
    new: u64,
    prealloc: Preallocation,
    shrink: bool,
    zero_new: bool,
) -> Result<()> {
    let mut m = dev.lock();
    let old = m.size();
    if !new.is_multiple_of(512) {
        return Err(Error::invalid("The new size must be a multiple of 512"));
    }
    if new < old && !shrink {
        return Err(Error::invalid(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    if prealloc != Preallocation::Off && new < old {
        return Err(Error::invalid(
            "Preallocation can only be used for growing images",
        ));
    }
    let backed = m.h().backing_file.is_some() || dev.backing().is_some();
    if !m.snapshots().is_empty() && m.h().version < 3 {
        // qemu's refusal (v2 snapshots have no size of their own).
        return Err(Error::invalid(
            "Can't resize a v2 image which has snapshots",
        ));
    }
    if new != old && !dev.bitmaps.is_empty() {
        let mut t = dev.tracked.lock().unwrap_or_else(|e| e.into_inner());
        crate::features::dirty::prepare_resize(&mut m, &mut t, new)?;
    }
    if new < old {
        // Frees clusters (which moves the host epoch); the bump here also covers an
        // external data file cut short, whose bytes past `new` stop being guest data.
        m.epoch().bump();
        shrink_clusters(&mut m, new)?;
    }
    let need = m.h().l1_entries_for(new);
    if need > m.l1().len() as u64 {
        grow_l1(dev, &mut m, need)?;
    }
    // As qemu's `qcow2_co_truncate`: without preallocation an external data file takes
    // the new size (so a new image's data file is as long as the disk); a raw one
    // always does.
    if (m.h().autoclear & AUTOCLEAR_DATA_RAW != 0 || prealloc == Preallocation::Off)
        && let Some(d) = &dev.data
    {
        d.set_len(new)?;
        d.flush()?;
    }
    m.write_header_size(new)?;
    dev.set_size(&mut m, new);
    drop(m);
    for t in dev
        .tracked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter_mut()
    {
        t.truncate(new);
    }
    if new > old && prealloc != Preallocation::Off {
        // Over a backing image the new clusters are zeroed below (as qemu's block
        // layer asks for a zero write there), their subclusters first unallocated.
        preallocate(dev, prealloc, backed, old)?;
    }
    if new > old && backed && zero_new {
        // As qemu: the new area must not show the backing image's data.
        write_zeroes(dev, old, new - old, false)?;
        dev.lock().commit_deferred()?;
        dev.file.flush()?;
    }
    Ok(())
}

/// Deallocates every cluster at or beyond `new` (rounded up to a cluster), as qemu's
/// full discard on shrink: L2 tables wholly beyond are dropped from the L1 table. With
/// internal snapshots only the active tree loses its references (the snapshots keep
/// their clusters and their disk size).
fn shrink_clusters(m: &mut Meta, new: u64) -> Result<()> {
    m.commit_deferred()?;
    let cs = m.cs();
    let cov = m.h().l1_coverage();
    let first = new.div_ceil(cs) * cs;
    let l1_len = m.l1().len() as u64;
    let mut p = Pending::default();
    let mut dropped_tables = Vec::new();
    for l1i in first / cov..l1_len {
        let mut l2 = m.l2_offset(l1i)?;
        if l2 == 0 {
            continue;
        }
        let per = m.h().l2_entries();
        let start = if l1i * cov >= first {
            0
        } else {
            (first % cov) / cs
        };
        let whole = start == 0;
        if !whole {
            // The table keeps entries below the new end: it is changed in place, so a
            // table shared with a snapshot is copied first (data refcounts unchanged:
            // they count referencing trees, not tables).
            l2 = ensure_l2(m, l1i)?;
        }
        for i in start..per {
            let (e, bm, _) = m.l2_entry(l1i * cov + i * cs)?;
            if let Some(r) = old_ref(m, e) {
                p.unref.push(r);
            }
            // As qemu's full discard: the entry and its subcluster bitmap are cleared.
            if !whole && (e != 0 || bm != 0) {
                p.l2.push(L2Update::new(l2, i, 0, 0));
            }
        }
        if whole {
            dropped_tables.push((l1i, l2));
        }
    }
    for &(l1i, _) in &dropped_tables {
        m.write_l1_entry(l1i, 0)?;
    }
    m.file().flush()?;
    for (_, l2) in dropped_tables {
        p.unref.push((l2, cs));
    }
    m.punch_when_freed(&p.unref);
    m.defer(p.l2, p.unref, false)?;
    m.commit_deferred()?;
    truncate_tail(m)
}

/// As qemu after a shrink: the file ends after its last cluster in use (a failure only
/// leaves the file longer, as qemu's warning does).
fn truncate_tail(m: &mut Meta) -> Result<()> {
    if m.data().is_some() {
        return Ok(());
    }
    let cs = m.cs();
    let len = m.file().len()?;
    let mut last = len.div_ceil(cs);
    while last > 0 && m.refcount(last - 1)? == 0 {
        last -= 1;
    }
    if last > 0 && last * cs < len {
        m.file().flush()?;
        let _ = m.file().set_len(last * cs);
    }
    Ok(())
}

pub(crate) fn grow_l1(dev: &Qcow2Device, m: &mut Meta, need: u64) -> Result<()> {
    let cs = m.cs();
    if need * 8 > MAX_L1_BYTES {
        return Err(Error::invalid("qcow2: Image is too big"));
    }
    // New L2 tables waiting for their L1 entries must be on disk before the table is
    // copied (see `Meta::set_deferred_tables`).
    m.write_new_tables()?;
    let clusters = (need * 8).div_ceil(cs);
    dev.file.debug_event(DebugEvent::L1GrowAllocTable);
    let host = m.alloc_run(clusters)?;
    let mut table = m.l1().to_vec();
    table.resize(idx(need), 0);
    // Only the table's entries, as qemu's `qcow2_grow_l1_table` writes them: a new
    // image ends right after its L1 table, like qemu's (byte-identical files).
    dev.file.debug_event(DebugEvent::L1GrowWriteTable);
    dev.file.write_all_at(&encode_u64s(&table), host)?;
    dev.file.flush()?;
    let mut hdr = [0u8; 12];
    hdr.put_be_u32(
        0,
        u32::try_from(need).map_err(|_| Error::invalid("L1 size"))?,
    );
    hdr.put_be_u64(4, host);
    dev.file.debug_event(DebugEvent::L1GrowActivateTable);
    dev.file.write_all_at(&hdr, 36)?;
    dev.file.flush()?;
    let (old_off, old_n) = (m.l1_offset(), m.l1().len() as u64);
    m.replace_l1(table, host);
    m.note_meta(MetaKind::ActiveL1, host, clusters * cs);
    if old_n > 0 {
        m.unref_range(old_off & L1E_OFFSET_MASK, old_n * 8)?;
    }
    Ok(())
}

/// Writes encrypted zeroes over `len` preallocated bytes at `host` (guest `guest`): with
/// encryption, clusters whose host bytes were never written would read back as
/// decrypted garbage (qemu's do; convert then writes the zeroes itself, its target
/// lacking zero-init), here they read as zeroes like those of any other image.
fn encrypt_zeroes(
    c: &crate::encryption::Encryption,
    store: &dyn diskimg_blockio::Storage,
    host: u64,
    guest: u64,
    len: u64,
) -> Result<()> {
    diskimg_blockio::zero_by_buffer(0, len, |buf, done| {
        c.write(store, buf, host + done, guest + done)
    })
}

/// Allocates every cluster of the disk (`preallocation=metadata|falloc|full`).
pub(crate) fn preallocate(
    dev: &Qcow2Device,
    mode: Preallocation,
    backing: bool,
    from: u64,
) -> Result<()> {
    let mut m = dev.lock();
    m.commit_deferred()?;
    let cs = m.cs();
    let size = m.size();
    let per_l2 = m.h().l2_entries();
    let ext = m.h().extended_l2();
    let mut g = from.div_ceil(cs) * cs;
    while g < size {
        let l1i = g / m.h().l1_coverage();
        let l2 = ensure_l2(&mut m, l1i)?;
        let i0 = (g / cs) % per_l2;
        let n = ((size - g).div_ceil(cs)).min(per_l2 - i0);
        let host = if m.data().is_some() {
            g
        } else {
            m.alloc_run(n)?
        };
        let store = m.data_store().clone();
        if matches!(mode, Preallocation::Falloc | Preallocation::Full) {
            store.preallocate(host, n * cs, mode)?;
        } else {
            let want = if m.data().is_some() {
                size
            } else {
                host + n * cs
            };
            if store.len()? < want {
                store.set_len(want)?;
            }
        }
        if let Some(c) = dev.crypt.as_deref() {
            encrypt_zeroes(c, store.as_ref(), host, g, n * cs)?;
        }
        dev.file.flush()?;
        if let Some(d) = &dev.data {
            d.flush()?;
        }
        let mut table = m.l2_table(l2)?.clone();
        for k in 0..n {
            let e = (host + k * cs) | OFLAG_COPIED;
            let k = k + i0;
            if ext {
                if let Some(s) = table.get_mut(idx(2 * k)) {
                    *s = e;
                }
                if let Some(s) = table.get_mut(idx(2 * k + 1)) {
                    *s = if backing { 0 } else { ALL_ALLOC };
                }
            } else if let Some(s) = table.get_mut(idx(k)) {
                *s = e;
            }
        }
        m.write_l2_table(l2, table)?;
        g += n * cs;
    }
    dev.file.flush()
}
