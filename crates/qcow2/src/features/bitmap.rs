//! Persistent dirty bitmaps as `qemu-img bitmap` edits them (spec "Bitmaps extension",
//! "Bitmap directory", "Bitmap table"): add (empty), remove, clear, enable, disable.
//! Merging is not supported.
//!
//! Order: new bitmap tables and the new directory go to fresh clusters and are flushed,
//! then the header (bitmaps extension, autoclear bit 0) switches to the new directory,
//! and only then are the old directory and dropped tables/data clusters freed: a crash
//! leaves the old or the new state, plus leaks.

use std::sync::Arc;

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{BitmapData, BitmapOp, Error, OpenOptions, Result, Storage};

use crate::device::Qcow2Device;
use crate::disk::ext::BitmapsExt;
use crate::disk::header::AUTOCLEAR_BITMAPS;
use crate::disk::idx;
use crate::disk::table::L2E_OFFSET_MASK;
use crate::engine::meta::write_header;
use crate::engine::meta::{Meta, read_host};
use crate::engine::overlap::MetaKind;
use crate::errors::internal;
use crate::open_options::Qcow2OpenOptions;

/// A directory entry kept with its extra data.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) table_offset: u64,
    pub(crate) table_size: u32,
    /// Bit 0 `in_use`, bit 1 `auto`.
    pub(crate) flags: u32,
    ty: u8,
    pub(crate) gbits: u8,
    extra: Vec<u8>,
    pub(crate) name: String,
}

pub(crate) fn read_directory(m: &Meta) -> Result<Vec<Entry>> {
    let Some(b) = m
        .h()
        .ext
        .bitmaps
        .filter(|_| m.h().autoclear & AUTOCLEAR_BITMAPS != 0)
    else {
        return Ok(Vec::new());
    };
    if b.directory_size > 64 << 20 {
        return Err(Error::corrupt(
            "qcow2",
            "invalid bitmap directory",
            b.directory_offset,
        ));
    }
    let mut buf = m.limits().alloc("bitmap directory", b.directory_size)?;
    read_host(m.file().as_ref(), &mut buf, b.directory_offset)?;
    let mut out = Vec::new();
    let mut off = 0usize;
    let trunc = || Error::corrupt("qcow2", "bitmap directory truncated", b.directory_offset);
    for _ in 0..b.nb_bitmaps {
        let table_offset = buf.be_u64(off).ok_or_else(trunc)?;
        let table_size = buf.be_u32(off + 8).ok_or_else(trunc)?;
        let flags = buf.be_u32(off + 12).ok_or_else(trunc)?;
        let ty = *buf.get(off + 16).ok_or_else(trunc)?;
        let gbits = *buf.get(off + 17).ok_or_else(trunc)?;
        let name_size = usize::from(buf.be_u16(off + 18).ok_or_else(trunc)?);
        let extra_size =
            usize::try_from(buf.be_u32(off + 20).ok_or_else(trunc)?).map_err(|_| trunc())?;
        let x0 = off.checked_add(24).ok_or_else(trunc)?;
        let n0 = x0.checked_add(extra_size).ok_or_else(trunc)?;
        let n1 = n0.checked_add(name_size).ok_or_else(trunc)?;
        out.push(Entry {
            table_offset,
            table_size,
            flags,
            ty,
            gbits,
            extra: buf.get(x0..n0).ok_or_else(trunc)?.to_vec(),
            name: String::from_utf8_lossy(buf.get(n0..n1).ok_or_else(trunc)?).into_owned(),
        });
        off = n1.next_multiple_of(8);
    }
    Ok(out)
}

fn serialise(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.resize(start + 24, 0);
        out.put_be_u64(start, e.table_offset);
        out.put_be_u32(start + 8, e.table_size);
        out.put_be_u32(start + 12, e.flags);
        out.put(start + 16, &[e.ty, e.gbits]);
        out.put_be_u16(start + 18, u16::try_from(e.name.len()).unwrap_or(0));
        out.put_be_u32(start + 20, u32::try_from(e.extra.len()).unwrap_or(0));
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// A failed write of bitmap `name`'s tables or data, in qemu's words (`store_bitmap`:
/// "Failed to write bitmap 'NAME' to file", with the OS error).
pub(crate) fn write_failed(name: &str, e: Error) -> Error {
    match e {
        Error::Io { source, .. } => {
            Error::io(format!("Failed to write bitmap '{name}' to file"), source)
        }
        e => e,
    }
}

fn failed(op: &str, name: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("Operation {op} on bitmap {name} failed: {why}"))
}

/// Applies `ops` (in order) to bitmap `name` of the qcow2 image on `file`, as
/// `qemu-img bitmap` does.
pub fn edit_bitmaps(file: Arc<dyn Storage>, name: &str, ops: &[BitmapOp]) -> Result<()> {
    let typed = Qcow2OpenOptions::new().bitmap_edit(true);
    let dev = Qcow2Device::open_with(file, &OpenOptions::new(), &typed)?;
    dev.writable()?;
    let mut m = dev.lock();
    m.commit_deferred()?;
    for op in ops {
        apply(&mut m, name, op)?;
    }
    m.file().flush()?;
    Ok(())
}

/// Applies one edit to bitmap `name`: a new bitmap directory, then the clusters it no
/// longer points to are freed.
fn apply(m: &mut Meta, name: &str, op: &BitmapOp) -> Result<()> {
    let mut dir = read_directory(m)?;
    let pos = dir.iter().position(|e| e.name == name);
    let mut free: Vec<(u64, u64)> = Vec::new();
    let not_found = || {
        failed(
            op.verb(),
            name,
            format_args!("Dirty bitmap '{name}' not found"),
        )
    };
    match op {
        BitmapOp::Add {
            granularity,
            enabled,
        } => {
            if pos.is_some() {
                return Err(failed(
                    "add",
                    name,
                    format_args!("Bitmap already exists: {name}"),
                ));
            }
            // As qemu-img, which stores every bitmap anew when it closes the image: the
            // existing bitmaps get new tables (and data clusters), then the new one its
            // table, then the directory; the old tables are freed after.
            let g = check_new(m, name, *granularity)?;
            for e in &mut dir {
                free.extend(table_clusters(m, e)?);
                e.table_offset = store_anew(m, e)?;
            }
            dir.push(new_entry(m, name, g, *enabled)?);
        }
        BitmapOp::Remove => {
            let e = dir.remove(pos.ok_or_else(not_found)?);
            free.extend(table_clusters(m, &e)?);
        }
        BitmapOp::Clear => {
            let e = dir
                .get(pos.ok_or_else(not_found)?)
                .cloned()
                .ok_or_else(not_found)?;
            return clear(m, &e);
        }
        BitmapOp::Merge(_) | BitmapOp::MergeBits { .. } => {
            let i = pos.ok_or_else(not_found)?;
            free.extend(merge(m, &mut dir, i, name, op)?);
        }
        BitmapOp::Enable | BitmapOp::Disable => {
            let e = dir
                .get_mut(pos.ok_or_else(not_found)?)
                .ok_or_else(not_found)?;
            if *op == BitmapOp::Enable {
                e.flags |= 2;
            } else {
                e.flags &= !2;
            }
        }
    }
    write_directory(m, &dir)?;
    for (o, l) in free {
        m.unref_range(o, l)?;
    }
    Ok(())
}

/// `add`'s refusals, before anything is written (qemu's words); the granularity.
fn check_new(m: &Meta, name: &str, granularity: Option<u64>) -> Result<u64> {
    if m.h().version < 3 {
        return Err(failed(
            "add",
            name,
            "Cannot store dirty bitmaps in qcow2 v2 files",
        ));
    }
    let g = granularity.unwrap_or(m.cs());
    if !g.is_power_of_two() || g < 512 {
        return Err(failed(
            "add",
            name,
            "Granularity must be power of 2 and at least 512",
        ));
    }
    if !(512..=1u64 << 31).contains(&g) || name.is_empty() || name.len() > 1023 {
        return Err(failed("add", name, "Invalid bitmap parameters"));
    }
    Ok(g)
}

/// `add`: the directory entry of a new, empty bitmap of granularity `g` with a zeroed
/// table.
fn new_entry(m: &mut Meta, name: &str, g: u64, enabled: bool) -> Result<Entry> {
    let cs = m.cs();
    let bytes = m.size().div_ceil(g).div_ceil(8);
    let entries = bytes.div_ceil(cs);
    let tclusters = (entries * 8).div_ceil(cs).max(1);
    let table = m.alloc_run(tclusters)?;
    // As qemu: the table's bytes only (the file may end inside its cluster).
    m.file().write_zeroes(table, (entries * 8).max(8))?;
    Ok(Entry {
        table_offset: table,
        table_size: u32::try_from(entries).map_err(|_| failed("add", name, "too large"))?,
        flags: if enabled { 2 } else { 0 },
        ty: 1,
        gbits: u8::try_from(g.trailing_zeros()).unwrap_or(16),
        extra: Vec::new(),
        name: name.to_string(),
    })
}

/// `clear`: the table of `e` zeroed in place, its data clusters freed (the directory
/// stays as it is).
fn clear(m: &mut Meta, e: &Entry) -> Result<()> {
    let cs = m.cs();
    let data = table_clusters(m, e)?;
    let zero = m
        .limits()
        .alloc("bitmap table", u64::from(e.table_size) * 8)?;
    m.file().write_all_at(&zero, e.table_offset)?;
    m.file().flush()?;
    // Everything but the table itself was data.
    let tlen = (u64::from(e.table_size) * 8).div_ceil(cs) * cs;
    for (o, l) in data {
        if o != e.table_offset || l != tlen {
            m.unref_range(o, l)?;
        }
    }
    Ok(())
}

/// `merge`: the bits of another bitmap (or given bits) ORed into entry `i` of `dir`,
/// written to new clusters; returns the old clusters to free once `dir` is written.
fn merge(
    m: &mut Meta,
    dir: &mut [Entry],
    i: usize,
    name: &str,
    op: &BitmapOp,
) -> Result<Vec<(u64, u64)>> {
    let not_found = || {
        failed(
            "merge",
            name,
            format_args!("Dirty bitmap '{name}' not found"),
        )
    };
    let dst = dir.get(i).cloned().ok_or_else(not_found)?;
    let inconsistent = |e: &Entry| {
        failed(
            "merge",
            name,
            format_args!("Bitmap '{}' is inconsistent and cannot be used", e.name),
        )
    };
    if dst.flags & 1 != 0 {
        return Err(inconsistent(&dst));
    }
    let (sbits, sgran) = match op {
        BitmapOp::Merge(source) => {
            let src = dir
                .iter()
                .find(|e| &e.name == source)
                .cloned()
                .ok_or_else(|| {
                    failed(
                        "merge",
                        name,
                        format_args!("Dirty bitmap '{source}' not found"),
                    )
                })?;
            if src.flags & 1 != 0 {
                return Err(inconsistent(&src));
            }
            (read_bits(m, &src)?, 1u64 << src.gbits.min(63))
        }
        BitmapOp::MergeBits { granularity, bits } => (bits.clone(), *granularity),
        _ => return Err(not_found()),
    };
    let mut dbits = read_bits(m, &dst)?;
    merge_bits(
        m.size(),
        &sbits,
        sgran.max(1),
        &mut dbits,
        1u64 << dst.gbits.min(63),
    );
    // qemu stores the merged bits when the image closes: a failure is the close's.
    let (table, size) = write_bits(m, &dbits).map_err(|e| write_failed(&dst.name, e))?;
    let free = table_clusters(m, &dst)?;
    if let Some(e) = dir.get_mut(i) {
        e.table_offset = table;
        e.table_size = size;
    }
    Ok(free)
}

/// The table's clusters and the data clusters it points to.
pub(crate) fn table_clusters(m: &Meta, e: &Entry) -> Result<Vec<(u64, u64)>> {
    let cs = m.cs();
    let t = m.read_table("bitmap table", e.table_offset, u64::from(e.table_size))?;
    let mut out = vec![(
        e.table_offset,
        (u64::from(e.table_size) * 8).div_ceil(cs).max(1) * cs,
    )];
    for x in t {
        let off = x & L2E_OFFSET_MASK;
        if off != 0 {
            out.push((off, cs));
        }
    }
    Ok(out)
}

/// Writes `dir` to new clusters, switches the header to it, frees the old directory.
pub(crate) fn write_directory(m: &mut Meta, dir: &[Entry]) -> Result<()> {
    let cs = m.cs();
    let old = m
        .h()
        .ext
        .bitmaps
        .filter(|_| m.h().autoclear & AUTOCLEAR_BITMAPS != 0);
    let bytes = serialise(dir);
    let mut h = m.h().clone();
    if dir.is_empty() {
        h.ext.bitmaps = None;
        h.autoclear &= !AUTOCLEAR_BITMAPS;
    } else {
        let n = (bytes.len() as u64).div_ceil(cs);
        let off = m.alloc_run(n)?;
        // As qemu: the directory's bytes only (the file may end inside its cluster).
        m.file().write_all_at(&bytes, off)?;
        m.file().flush()?;
        h.ext.bitmaps = Some(BitmapsExt {
            nb_bitmaps: u32::try_from(dir.len()).map_err(|_| Error::invalid("too many bitmaps"))?,
            directory_size: bytes.len() as u64,
            directory_offset: off,
        });
        h.autoclear |= AUTOCLEAR_BITMAPS;
        m.note_meta(MetaKind::BitmapDirectory, off, n * cs);
    }
    write_header(m, &mut h)?;
    if let Some(o) = old {
        m.unref_range(
            o.directory_offset,
            o.directory_size.div_ceil(cs).max(1) * cs,
        )?;
    }
    Ok(())
}

/// The bitmap data of `e` (bit `i` of byte `k` is granule `8k + i`; spec "Bitmap table").
pub(crate) fn read_bits(m: &Meta, e: &Entry) -> Result<Vec<u8>> {
    let cs = m.cs();
    let g = 1u64 << e.gbits.min(63);
    let bytes = m.size().div_ceil(g).div_ceil(8);
    if u64::from(e.table_size) < bytes.div_ceil(cs) {
        return Err(Error::corrupt(
            "qcow2",
            "bitmap table too small",
            e.table_offset,
        ));
    }
    if e.table_offset == 0 || !e.table_offset.is_multiple_of(cs) {
        return Err(Error::corrupt(
            "qcow2",
            "bitmap table offset not cluster-aligned",
            e.table_offset,
        ));
    }
    let mut out = m.limits().alloc("bitmap data", bytes)?;
    let t = m.read_table("bitmap table", e.table_offset, u64::from(e.table_size))?;
    for (k, &x) in t.iter().enumerate() {
        let start = k as u64 * cs;
        if start >= bytes {
            break;
        }
        let n = cs.min(bytes - start);
        let dst = out
            .get_mut(idx(start)..idx(start + n))
            .ok_or(internal("bitmap data"))?;
        match x & L2E_OFFSET_MASK {
            0 if x & 1 != 0 => dst.fill(0xff),
            0 => {}
            // qemu's `check_table_entry`: data clusters are cluster-aligned.
            off if !off.is_multiple_of(cs) => {
                return Err(Error::corrupt(
                    "qcow2",
                    "bitmap table entry not cluster-aligned",
                    e.table_offset,
                ));
            }
            off => read_host(m.file().as_ref(), dst, off)?,
        }
    }
    Ok(out)
}

/// ORs `src` (granularity `gs`) into `dst` (granularity `gd`) for a `size`-byte disk.
fn merge_bits(size: u64, src: &[u8], gs: u64, dst: &mut [u8], gd: u64) {
    for (k, &b) in src.iter().enumerate() {
        if b == 0 {
            continue;
        }
        for i in 0..8u64 {
            if b & (1 << i) == 0 {
                continue;
            }
            let start = (k as u64 * 8 + i).saturating_mul(gs);
            if start >= size {
                break;
            }
            let end = start.saturating_add(gs).min(size);
            for j in start / gd..=(end - 1) / gd {
                if let Some(d) = dst.get_mut(idx(j / 8)) {
                    *d |= 1 << (j % 8);
                }
            }
        }
    }
}

/// Stores bitmap `e` anew, as qemu's `store_bitmap`: its data clusters copied to new
/// clusters one at a time (all-zero ones left unallocated), then a new table of the
/// same size. Returns the new table's offset.
fn store_anew(m: &mut Meta, e: &Entry) -> Result<u64> {
    let cs = m.cs();
    let mut table = m.read_table("bitmap table", e.table_offset, u64::from(e.table_size))?;
    let mut buf = m.limits().alloc("bitmap data", cs)?;
    for x in &mut table {
        let off = *x & L2E_OFFSET_MASK;
        match off {
            0 if *x & 1 != 0 => buf.fill(0xff),
            0 => continue,
            _ => read_host(m.file().as_ref(), &mut buf, off)?,
        }
        *x = if buf.iter().all(|&b| b == 0) {
            0
        } else {
            let new = m.alloc_run(1)?;
            m.file().write_all_at(&buf, new)?;
            new
        };
    }
    let tclusters = (table.len() as u64 * 8).div_ceil(cs).max(1);
    let toff = m.alloc_run(tclusters)?;
    m.file()
        .write_all_at(&crate::disk::table::encode_u64s(&table), toff)?;
    m.file().flush()?;
    Ok(toff)
}

/// Writes bitmap data to new clusters (all-zero clusters stay unallocated) and a new
/// table; returns the table's offset and entry count. Flushed before returning.
pub(crate) fn write_bits(m: &mut Meta, bits: &[u8]) -> Result<(u64, u32)> {
    let cs = m.cs();
    let entries = (bits.len() as u64).div_ceil(cs);
    let mut table = m.limits().alloc_elems::<u64>("bitmap table", entries, 8)?;
    for (k, chunk) in bits.chunks(idx(cs)).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let off = m.alloc_run(1)?;
        let mut buf = m.limits().alloc("bitmap data", cs)?;
        if let Some(d) = buf.get_mut(..chunk.len()) {
            d.copy_from_slice(chunk);
        }
        m.file().write_all_at(&buf, off)?;
        if let Some(t) = table.get_mut(k) {
            *t = off;
        }
    }
    let tclusters = (entries * 8).div_ceil(cs).max(1);
    let toff = m.alloc_run(tclusters)?;
    let tbuf = crate::disk::table::encode_u64s(&table);
    m.file().write_all_at(&tbuf, toff)?;
    m.file().flush()?;
    let n = u32::try_from(entries).map_err(|_| Error::invalid("bitmap too large"))?;
    Ok((toff, n))
}

/// The bitmap data of bitmap `name` of the qcow2 image on `file` (granularity, bytes;
/// bit `i` of byte `k` covers granule `8k + i`).
pub fn read_bitmap(file: Arc<dyn Storage>, name: &str) -> Result<(u64, Vec<u8>)> {
    let dev = Qcow2Device::open(file, &OpenOptions::new().read_only(true))?;
    let BitmapData { granularity, bits } = read_named(&dev.lock(), name)?;
    Ok((granularity, bits))
}

/// The stored bits of bitmap `name`.
pub(crate) fn read_named(m: &Meta, name: &str) -> Result<BitmapData> {
    let e = read_directory(m)?
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| Error::invalid(format!("Dirty bitmap '{name}' not found")))?;
    Ok(BitmapData {
        granularity: 1u64 << e.gbits.min(63),
        bits: read_bits(m, &e)?,
    })
}
