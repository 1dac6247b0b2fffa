//! Persistent dirty bitmaps on disk (spec "Bitmaps extension", "Bitmap directory",
//! "Bitmap table"): reading the directory and a bitmap's bits, writing bits to new
//! clusters, and switching the header to a new directory. [`crate::features::dirty`]
//! loads and stores the bitmaps of a read-write open with these, and
//! [`crate::features::bitmap_edit`] edits them as `qemu-img bitmap` does.
//!
//! Order: new bitmap tables and the new directory go to fresh clusters and are flushed,
//! then the header (bitmaps extension, autoclear bit 0) switches to the new directory,
//! and only then are the old directory and dropped tables/data clusters freed: a crash
//! leaves the old or the new state, plus leaks. Only flags change in place
//! ([`write_directory_in_place`], with the autoclear bit cleared meanwhile).

use std::sync::Arc;

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{BitmapData, Error, OpenOptions, Result, Storage};

use crate::device::Qcow2Device;
use crate::disk::bitmap_dir::{
    BitmapEntry, parse_bitmap_directory, read_directory_bytes, table_entries_needed,
};
use crate::disk::ext::BitmapsExt;
use crate::disk::header::AUTOCLEAR_BITMAPS;
use crate::disk::idx;
use crate::disk::table::L2E_OFFSET_MASK;
use crate::engine::meta::write_header;
use crate::engine::meta::{Meta, read_host};
use crate::engine::overlap::MetaKind;
use crate::errors::internal;
use crate::tracked::Tracked;

/// A directory entry as the edits change it (type 1, no extra data: the only entries
/// [`parse_bitmap_directory`] accepts, and the only ones qemu writes).
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) table_offset: u64,
    pub(crate) table_size: u32,
    /// Bit 0 `in_use`, bit 1 `auto`.
    pub(crate) flags: u32,
    pub(crate) gbits: u8,
    pub(crate) name: String,
}

impl Entry {
    /// The entry of a bitmap stored at `table` (`table_size` entries) with `flags`.
    pub(crate) fn new(name: &str, gbits: u8, flags: u32, table: u64, table_size: u32) -> Self {
        Entry {
            table_offset: table,
            table_size,
            flags,
            gbits,
            name: name.to_string(),
        }
    }
}

impl From<BitmapEntry> for Entry {
    fn from(e: BitmapEntry) -> Self {
        Entry {
            table_offset: e.table_offset,
            table_size: e.table_size,
            flags: e.flags,
            gbits: e.gbits,
            name: e.name,
        }
    }
}

/// The bitmaps extension, when its autoclear bit says it is valid.
fn live_ext(m: &Meta) -> Option<BitmapsExt> {
    m.h()
        .ext
        .bitmaps
        .filter(|_| m.h().autoclear & AUTOCLEAR_BITMAPS != 0)
}

/// The bitmap directory (empty without the extension or its autoclear bit), read and
/// checked by the parser the open uses ([`parse_bitmap_directory`], qemu's
/// `bitmap_list_load`), so an edit sees the directory exactly as the open judged it.
pub(crate) fn read_directory(m: &Meta) -> Result<Vec<Entry>> {
    let Some(b) = live_ext(m) else {
        return Ok(Vec::new());
    };
    let buf = read_directory_bytes(m.file().as_ref(), &m.limits(), &b)?;
    let dir = parse_bitmap_directory(&buf, b.directory_offset, b.nb_bitmaps, m.cs(), m.size())?;
    Ok(dir.into_iter().map(Entry::from).collect())
}

fn serialise(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.resize(start + 24, 0);
        out.put_be_u64(start, e.table_offset);
        out.put_be_u32(start + 8, e.table_size);
        out.put_be_u32(start + 12, e.flags);
        out.put(start + 16, &[1, e.gbits]);
        out.put_be_u16(start + 18, u16::try_from(e.name.len()).unwrap_or(0));
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

pub(crate) fn failed(op: &str, name: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("Operation {op} on bitmap {name} failed: {why}"))
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
    let old = live_ext(m);
    let bytes = serialise(dir);
    let mut h = m.h().clone();
    if dir.is_empty() {
        h.ext.bitmaps = None;
        h.autoclear &= !AUTOCLEAR_BITMAPS;
    } else {
        let n = (bytes.len() as u64).div_ceil(cs);
        let off = m.alloc_run(n)?;
        // As qemu: the directory's bytes only (the file may end inside its cluster).
        let put = m.file().write_all_at(&bytes, off);
        if let Err(e) = put.and_then(|()| m.file().flush()) {
            free_all(m, &[(off, n * cs)]);
            return Err(e);
        }
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
    check_table(m, e)?;
    // The table first (it must lie in the file): the bits are sized by the disk, and
    // there are at most a cluster of them per table entry.
    let t = read_checked_table(m, e)?;
    let mut out = m.limits().alloc("bitmap data", bytes)?;
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
            off => read_host(m.file().as_ref(), dst, off)?,
        }
    }
    Ok(out)
}

/// Bitmap `e` as a [`Tracked`] (chunks of one cluster; clusters with no bit set not
/// held), checked as [`read_bits`] checks it; what it holds is bounded by the limits.
pub(crate) fn load_tracked(m: &Meta, e: &Entry) -> Result<Tracked> {
    let cs = m.cs();
    let g = 1u64 << e.gbits.min(63);
    // The table is checked and read (it lies in the file) before the bitmap is sized by
    // the disk: a tiny granularity on a huge disk would otherwise reserve a chunk slot per
    // cluster of bits (16 bytes each; 2^28 for 2^61 bytes at 512-byte granules) first.
    check_table(m, e)?;
    let table = read_checked_table(m, e)?;
    let mut t = Tracked::new(&e.name, g, e.flags & 2 != 0, m.size(), cs);
    let mut buf = m.limits().alloc("bitmap data", cs)?;
    for (k, &x) in table.iter().enumerate().take(t.chunk_count()) {
        match x & L2E_OFFSET_MASK {
            0 if x & 1 != 0 => buf.fill(0xff),
            0 => continue,
            off => read_host(m.file().as_ref(), &mut buf, off)?,
        }
        m.limits().check("bitmap data", t.held_bytes() + cs)?;
        t.set_chunk(k, &buf);
    }
    Ok(t)
}

/// Bitmap table entry bits no version of the spec defines (1-8 and 56-63; qemu's
/// `BME_TABLE_ENTRY_RESERVED_MASK`).
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;

/// The bitmap table of `e`, every entry checked as qemu's `bitmap_table_load` checks
/// it (`check_table_entry`): no reserved bit, and a data cluster offset aligned and
/// without the all-ones flag.
fn read_checked_table(m: &Meta, e: &Entry) -> Result<Vec<u64>> {
    checked_table(m, &e.name, e.table_offset, e.table_size)
}

/// The table of every bitmap in `dir` that is not in use, checked as qemu's
/// `load_bitmap` checks it at every open (read-only too), bitmap by bitmap: each entry
/// ([`read_checked_table`]), then the size (exactly the entries the disk needs).
pub(crate) fn check_tables(m: &Meta, dir: &[BitmapEntry]) -> Result<()> {
    for e in dir.iter().filter(|e| !e.in_use) {
        checked_table(m, &e.name, e.table_offset, e.table_size)?;
        table_size_fits(m, &e.name, e.gbits, e.table_offset, e.table_size)?;
    }
    Ok(())
}

/// qemu's `load_bitmap_data` check: the table has exactly as many entries as the disk
/// needs (one too many is refused as one too few), in qemu's words.
fn table_size_fits(m: &Meta, name: &str, gbits: u8, off: u64, size: u32) -> Result<()> {
    if u64::from(size) != table_entries_needed(m.size(), gbits, m.cs()) {
        return Err(Error::corrupt(
            "qcow2",
            format!("Could not read bitmap '{name}' from image: Invalid argument"),
            off,
        ));
    }
    Ok(())
}

fn checked_table(m: &Meta, name: &str, off: u64, size: u32) -> Result<Vec<u64>> {
    let t = m.read_table("bitmap table", off, u64::from(size))?;
    let bad = |x: u64| {
        let off = x & L2E_OFFSET_MASK;
        x & TABLE_ENTRY_RESERVED != 0 || (off != 0 && (x & 1 != 0 || !off.is_multiple_of(m.cs())))
    };
    if t.iter().any(|&x| bad(x)) {
        return Err(Error::corrupt(
            "qcow2",
            format!(
                "Could not read bitmap_table table from image for bitmap '{name}': Invalid \
                 argument"
            ),
            off,
        ));
    }
    Ok(t)
}

/// qemu's checks of a bitmap's table before its bits are read (`check_dir_entry`'s
/// offset rules, `load_bitmap_data`'s size rule), in qemu's words. The open checked
/// them for every bitmap not in use; this covers those read after (in use at open).
fn check_table(m: &Meta, e: &Entry) -> Result<()> {
    if e.table_offset == 0 || !e.table_offset.is_multiple_of(m.cs()) {
        return Err(Error::corrupt(
            "qcow2",
            format!("Bitmap '{}' doesn't satisfy the constraints", e.name),
            e.table_offset,
        ));
    }
    table_size_fits(m, &e.name, e.gbits, e.table_offset, e.table_size)
}

/// A bitmap written by [`write_bits`]: its table and every cluster allocated for it.
pub(crate) struct Written {
    /// The table's host offset and entry count.
    pub(crate) table: u64,
    pub(crate) entries: u32,
    /// The clusters allocated (data clusters, then the table), as (offset, length).
    pub(crate) clusters: Vec<(u64, u64)>,
}

/// Writes bitmap `t` to new clusters as qemu's `store_bitmap` does: each data cluster
/// allocated and written in turn (clusters with no bit set stay unallocated), then the
/// table. Flushed before returning. On failure the clusters allocated here are freed.
pub(crate) fn write_bits(m: &mut Meta, t: &Tracked) -> Result<Written> {
    let mut clusters = Vec::new();
    match write_bits_into(m, t, &mut clusters) {
        Ok((table, entries)) => Ok(Written {
            table,
            entries,
            clusters,
        }),
        Err(e) => {
            free_all(m, &clusters);
            Err(e)
        }
    }
}

fn write_bits_into(
    m: &mut Meta,
    t: &Tracked,
    clusters: &mut Vec<(u64, u64)>,
) -> Result<(u64, u32)> {
    let cs = m.cs();
    let entries = t.chunk_count() as u64;
    let n = u32::try_from(entries).map_err(|_| Error::invalid("bitmap too large"))?;
    let mut table = m.limits().alloc_elems::<u64>("bitmap table", entries, 8)?;
    for (k, chunk) in t.chunks().enumerate() {
        let Some(chunk) = chunk.filter(|c| c.iter().any(|&b| b != 0)) else {
            continue;
        };
        let off = m.alloc_run(1)?;
        clusters.push((off, cs));
        m.file().write_all_at(chunk, off)?;
        if let Some(e) = table.get_mut(k) {
            *e = off;
        }
    }
    let tclusters = (entries * 8).div_ceil(cs).max(1);
    let toff = m.alloc_run(tclusters)?;
    clusters.push((toff, tclusters * cs));
    let tbuf = crate::disk::table::encode_u64s(&table);
    m.file().write_all_at(&tbuf, toff)?;
    m.file().flush()?;
    Ok((toff, n))
}

/// Frees `clusters` after a failed store (qemu's `clear_bitmap_table` on its error path);
/// a failure to free leaves a leak, which is what `check -r leaks` is for.
pub(crate) fn free_all(m: &mut Meta, clusters: &[(u64, u64)]) {
    for &(o, l) in clusters {
        let _ = m.unref_range(o, l);
    }
}

/// Rewrites the directory `dir` in place (only flags may differ from what is stored:
/// the same size), as qemu's `update_ext_header_and_dir_in_place`: the header's
/// autoclear bit 0 is cleared first (readers then ignore the bitmaps), the directory
/// written and flushed, and the bit set again. A crash in between loses the bitmaps
/// (their clusters leak) but never leaves the image unreadable; nothing is allocated.
pub(crate) fn write_directory_in_place(m: &mut Meta, dir: &[Entry]) -> Result<()> {
    let Some(b) = live_ext(m) else {
        return Err(internal("bitmap directory in place without the extension"));
    };
    let bytes = serialise(dir);
    if bytes.len() as u64 != b.directory_size {
        return Err(internal("bitmap directory in place of another size"));
    }
    m.refuse_directory_in_place(b.directory_offset, b.directory_size)?;
    let autoclear = m.h().autoclear;
    m.write_autoclear(autoclear & !AUTOCLEAR_BITMAPS)?;
    m.file().write_all_at(&bytes, b.directory_offset)?;
    m.file().flush()?;
    m.write_autoclear(autoclear)
}

/// The bitmap data of bitmap `name` of the qcow2 image on `file` (granularity, bytes;
/// bit `i` of byte `k` covers granule `8k + i`).
pub fn read_bitmap(file: Arc<dyn Storage>, name: &str) -> Result<(u64, Vec<u8>)> {
    let dev = Qcow2Device::open(file, &OpenOptions::new().read_only(true))?;
    let BitmapData { granularity, bits } = read_named(&dev.lock(), name)?;
    Ok((granularity, bits))
}

/// Bitmap `name` as the open device sees it, as qemu's block layer does (what
/// `qemu-nbd -B NAME` exports as `qemu:dirty-bitmap:NAME`): a bitmap held in memory
/// since a read-write open, with the bits the writes since then have set; otherwise
/// (read-only opens, bitmaps `in_use` at open, after close) the stored bits.
pub(crate) fn read_current(dev: &Qcow2Device, name: &str) -> Result<BitmapData> {
    let limits = dev.lock().limits();
    {
        let held = dev.tracked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = held.iter().find(|t| t.name == name) {
            let mut bits = limits.alloc("bitmap data", t.dense_len() as u64)?;
            t.copy_to(&mut bits);
            return Ok(BitmapData {
                granularity: t.granularity,
                bits,
            });
        }
    }
    read_named(&dev.lock(), name)
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
