//! The in-memory metadata of one open image: header, L1 table, L2 cache, refcount table
//! and refcount block cache. Every method runs under the device's metadata lock.

use std::collections::HashMap;
use std::sync::Arc;

use diskimg_blockio::{DebugEvent, Error, Limits, Result, Storage};

use crate::disk::header::{Header, MAX_HOST_OFFSET, V2_HEADER_LEN};
use crate::disk::idx;
use crate::disk::table::{L1E_OFFSET_MASK, L2Cache, Sub, classify, decode_u64s, encode_u64s};
use crate::engine::deferred::{Deferred, L2Update};
use crate::engine::overlap::{MetaKind, Overlap};
use crate::errors::internal;

/// Metadata state (see module docs).
#[derive(Debug)]
pub(crate) struct Meta {
    /// The image file.
    pub(in crate::engine) file: Arc<dyn Storage>,
    /// The external data file, when the image has one.
    pub(in crate::engine) data: Option<Arc<dyn Storage>>,
    /// The header as on disk.
    pub(in crate::engine) h: Header,
    /// The L1 table in use (active, or a snapshot's).
    pub(in crate::engine) l1: Vec<u64>,
    /// Where `l1` lives.
    pub(in crate::engine) l1_offset: u64,
    /// Guest size of the view.
    pub(in crate::engine) size: u64,
    /// Cached L2 tables.
    pub(in crate::engine) l2: L2Cache,
    /// The refcount table.
    pub(in crate::engine) reftable: Vec<u64>,
    /// Cached refcount blocks (raw bytes).
    pub(in crate::engine) rb: HashMap<u64, Vec<u8>>,
    /// Resource limits.
    pub(in crate::engine) limits: Limits,
    /// First cluster index that may be free.
    pub(in crate::engine) free_hint: u64,
    /// Refcount-block allocation searches from here (above a run being allocated).
    pub(in crate::engine) alloc_floor: u64,
    /// Next free byte in the cluster compressed data is being packed into (0 = none).
    pub(in crate::engine) free_byte: u64,
    /// L2 updates applied in the cache but not yet written.
    pub(in crate::engine) deferred: Deferred,
    /// Host clusters holding metadata (header, tables), for qemu's overlap check.
    pub(in crate::engine) overlap: Overlap,
    /// A corruption event was reported (qemu reports the first one only, and a fatal
    /// one after non-fatal ones).
    pub(in crate::engine) corruption_reported: bool,
    /// A fatal corruption event was signalled: the image was marked corrupt (qemu then
    /// detaches the driver).
    pub(in crate::engine) corruption_fatal: bool,
    /// The image is open read-only: corruption events are not fatal (qemu's
    /// `bdrv_is_writable`), nothing is marked.
    pub(in crate::engine) read_only: bool,
    /// The internal snapshots (table order).
    pub(in crate::engine) snapshots: Vec<crate::disk::snapshot::Snapshot>,
    /// Bytes of the snapshot table.
    pub(in crate::engine) snapshot_table_len: u64,
    /// Clusters allocated ahead for guest writes (see `reserve`).
    pub(in crate::engine) reserve: crate::engine::reserve::Reserve,
    /// Lazy refcounts and the refcount blocks they hold (see `lazy`).
    pub(in crate::engine) lazy: crate::engine::lazy::Lazy,
    /// New L2 tables wait in the cache for the next deferred write (see
    /// [`Meta::set_deferred_tables`]).
    pub(in crate::engine) deferred_tables: bool,
    /// `pass-discard-snapshot=off` (see [`Meta::set_keep_snapshot_frees`]).
    pub(in crate::engine) keep_snapshot_frees: bool,
    /// Moves before a host cluster can become another guest range's home (see `epoch`).
    pub(in crate::engine) epoch: crate::engine::epoch::HostEpoch,
}

/// An answer from the L2 cache, or the host offset of the L2 table to load first.
pub(crate) enum Cached<T> {
    /// Answered from cached tables.
    Hit(T),
    /// The L2 table at this offset is not cached.
    Miss(u64),
}

/// Deferred L2 updates beyond which they are written without waiting for a flush.
const MAX_DEFERRED: usize = 16384;

/// Reads `buf` at `off` from `s`, zero-filling what lies beyond its end (qemu reads
/// past the end of a file as zeroes).
///
/// The read is tried first, so data inside the file costs no length query (`statx`).
pub(crate) fn read_host(s: &dyn Storage, buf: &mut [u8], off: u64) -> Result<()> {
    let err = match s.read_exact_at(buf, off) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let len = s.len()?;
    if off
        .checked_add(buf.len() as u64)
        .is_some_and(|end| end <= len)
    {
        return Err(err);
    }
    let avail = usize::try_from(len.saturating_sub(off).min(buf.len() as u64)).unwrap_or(0);
    let (head, tail) = buf.split_at_mut(avail);
    if !head.is_empty() {
        s.read_exact_at(head, off)?;
    }
    tail.fill(0);
    Ok(())
}

/// How many L2 tables of `cs` bytes the cache may hold (`limits.max_cache_bytes`).
fn cache_tables(limits: &Limits, cs: u64) -> usize {
    usize::try_from(limits.max_cache_bytes / cs).unwrap_or(16)
}

impl Meta {
    /// The metadata of the image on `file` with header `h`, before its tables are read:
    /// the active L1 table's place and the header's size, an empty L2 cache sized from
    /// `limits.max_cache_bytes`, nothing allocated, deferred or reserved.
    pub(crate) fn new(
        file: Arc<dyn Storage>,
        data: Option<Arc<dyn Storage>>,
        h: Header,
        limits: Limits,
    ) -> Self {
        let tables = cache_tables(&limits, h.cluster_size());
        Self {
            file,
            data,
            l1: Vec::new(),
            l1_offset: h.l1_table_offset,
            size: h.size,
            l2: L2Cache::new(tables),
            reftable: Vec::new(),
            rb: HashMap::new(),
            limits,
            free_hint: 0,
            alloc_floor: 0,
            free_byte: 0,
            deferred: Deferred::default(),
            overlap: Overlap::default(),
            corruption_reported: false,
            corruption_fatal: false,
            read_only: false,
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            reserve: crate::engine::reserve::Reserve::default(),
            lazy: crate::engine::lazy::Lazy::default(),
            deferred_tables: false,
            keep_snapshot_frees: false,
            epoch: crate::engine::epoch::HostEpoch::default(),
            h,
        }
    }

    /// Reads the refcount table the header points to (at open).
    pub(crate) fn load_reftable(&mut self) -> Result<()> {
        self.reftable = self.read_table(
            "Reference count table offset invalid",
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * self.cs() / 8,
        )?;
        Ok(())
    }

    /// Takes `other`'s refcount table (a snapshot view of the same image).
    pub(crate) fn share_reftable(&mut self, other: &Meta) {
        self.reftable.clone_from(&other.reftable);
    }

    /// The non-zero refcount table entries, as stored (offset and any reserved bits),
    /// with their index.
    pub(crate) fn reftable_entries(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.reftable
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, e)| e != 0)
    }

    /// Empties the L2 cache (after tables were rewritten behind it).
    pub(crate) fn reset_l2_cache(&mut self) {
        self.l2 = L2Cache::new(cache_tables(&self.limits, self.cs()));
    }

    /// Cluster size.
    pub(crate) fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    /// The storage guest data lives in.
    pub(crate) fn data_store(&self) -> &Arc<dyn Storage> {
        self.data.as_ref().unwrap_or(&self.file)
    }

    /// Reads a table of `n` u64 entries at `off` (bounded by the limits and the file).
    ///
    /// The range is checked against the file's length before anything is allocated, so
    /// a header claiming a huge table costs memory proportional to the file only.
    pub(crate) fn read_table(&self, what: &'static str, off: u64, n: u64) -> Result<Vec<u64>> {
        let bytes = n.checked_mul(8).ok_or(Error::corrupt("qcow2", what, off))?;
        match off.checked_add(bytes) {
            Some(end) if end <= self.file.len()? || bytes == 0 => {}
            _ => return Err(Error::corrupt("qcow2", what, off)),
        }
        let mut raw = self.limits.alloc(what, bytes)?;
        self.file.read_exact_at(&mut raw, off)?;
        let mut out = self.limits.alloc_elems::<u64>(what, n, 8)?;
        decode_u64s(&raw, &mut out);
        Ok(out)
    }

    /// Loads (or finds cached) the L2 table at `off`.
    pub(crate) fn l2_table(&mut self, off: u64) -> Result<&mut Vec<u64>> {
        if self.l2.get_mut(off).is_none() {
            let n = self.cs() / 8;
            self.file.debug_event(DebugEvent::L2Load);
            let t = self.read_table("L2 table beyond the end of the file", off, n)?;
            self.l2.insert(off, t);
        }
        self.l2
            .get_mut(off)
            .ok_or(Error::corrupt("qcow2", "L2 cache", off))
    }

    /// The L2 table offset L1 entry `i` holds and where the entry is in the file, when
    /// the offset is not cluster-aligned (qemu's `L2 table offset … unaligned` event).
    pub(crate) fn l1_misaligned(&self, i: u64) -> Option<(u64, u64)> {
        let e = usize::try_from(i).ok().and_then(|i| self.l1.get(i))?;
        let off = e & L1E_OFFSET_MASK;
        (!off.is_multiple_of(self.cs())).then(|| (off, self.l1_offset + i * 8))
    }

    /// The L2 table offset for L1 index `i` (0 = none), validated.
    pub(crate) fn l2_offset(&self, i: u64) -> Result<u64> {
        let Some(e) = usize::try_from(i).ok().and_then(|i| self.l1.get(i)) else {
            return Ok(0);
        };
        let off = e & L1E_OFFSET_MASK;
        if !off.is_multiple_of(self.cs()) {
            return Err(Error::corrupt(
                "qcow2",
                "L2 table offset not cluster-aligned",
                self.l1_offset + i * 8,
            ));
        }
        if off == 0 {
            return Ok(0);
        }
        if off >= MAX_HOST_OFFSET {
            return Err(Error::corrupt("qcow2", "L2 table offset invalid", off));
        }
        Ok(off)
    }

    /// The (entry, bitmap) pair and the L2 table offset for the cluster holding `guest`,
    /// answered from the L2 cache (shared access), or the table to load first.
    pub(crate) fn l2_entry_cached(&self, guest: u64) -> Result<Cached<(u64, u64, u64)>> {
        let cs = self.cs();
        let l2_off = self.l2_offset(guest / self.h.l1_coverage())?;
        if l2_off == 0 {
            return Ok(Cached::Hit((0, 0, 0)));
        }
        let Some(t) = self.l2.get(l2_off) else {
            return Ok(Cached::Miss(l2_off));
        };
        let i = (guest / cs) % self.h.l2_entries();
        let (e, b) = if self.h.extended_l2() {
            let k = usize::try_from(i * 2).unwrap_or(usize::MAX);
            (
                t.get(k).copied().unwrap_or(0),
                t.get(k + 1).copied().unwrap_or(0),
            )
        } else {
            let k = usize::try_from(i).unwrap_or(usize::MAX);
            (t.get(k).copied().unwrap_or(0), 0)
        };
        Ok(Cached::Hit((e, b, l2_off)))
    }

    /// The (entry, bitmap) pair and the L2 table offset for the cluster holding `guest`.
    pub(crate) fn l2_entry(&mut self, guest: u64) -> Result<(u64, u64, u64)> {
        if let Cached::Miss(off) = self.l2_entry_cached(guest)? {
            self.l2_table(off)?;
        }
        match self.l2_entry_cached(guest)? {
            Cached::Hit(v) => Ok(v),
            Cached::Miss(off) => Err(Error::corrupt("qcow2", "L2 cache", off)),
        }
    }

    /// Granule (cluster, or subcluster with extended L2) size.
    pub(crate) fn granule(&self) -> u64 {
        if self.h.extended_l2() {
            self.cs() / 32
        } else {
            self.cs()
        }
    }

    /// What `guest` is, and how many bytes from it (at most `max`) are the same kind
    /// with contiguous host offsets, loading the L2 tables it needs.
    pub(crate) fn resolve(&mut self, guest: u64, max: u64) -> Result<(Sub, u64)> {
        // Each round loads the table the cached walk stopped at; the bound only guards
        // against a cache too small to hold the tables of one run (a shorter run is a
        // valid answer).
        let mut best = None;
        for _ in 0..8 {
            match self.resolve_cached(guest, max)? {
                Cached::Miss(off) => {
                    self.l2_table(off)?;
                }
                Cached::Hit((sub, len, stop)) => {
                    best = Some((sub, len));
                    match stop {
                        Some(off) if len < max => self.l2_table(off).map(|_| ())?,
                        _ => break,
                    }
                }
            }
        }
        best.ok_or(Error::corrupt("qcow2", "L2 cache", guest))
    }

    /// [`Meta::resolve`] from the L2 cache alone (shared access, so readers need not
    /// exclude each other): `Miss` names the table to load when the first granule's is
    /// not cached; a run cut short by an uncached table names it as the third field.
    pub(crate) fn resolve_cached(
        &self,
        guest: u64,
        max: u64,
    ) -> Result<Cached<(Sub, u64, Option<u64>)>> {
        let g = self.granule();
        let first = match self.sub_at_cached(guest)? {
            Cached::Hit(s) => s,
            Cached::Miss(off) => return Ok(Cached::Miss(off)),
        };
        let cov = self.h.l1_coverage();
        if first == Sub::Unalloc && self.l2_offset(guest / cov)? == 0 {
            let mut len = (cov - guest % cov).min(max);
            while len < max && self.l2_offset((guest + len) / cov)? == 0 {
                len = len.saturating_add(cov).min(max);
            }
            return Ok(Cached::Hit((first, len, None)));
        }
        if let Sub::Compressed(..) = first {
            return Ok(Cached::Hit((
                first,
                (self.cs() - guest % self.cs()).min(max),
                None,
            )));
        }
        let mut len = (g - guest % g).min(max);
        let mut stop = None;
        // Bound the work of one call: callers loop over shorter runs.
        let mut budget = 1u32 << 16;
        while len < max && budget > 0 {
            budget -= 1;
            let next = guest + len;
            // Whole L1 ranges without an L2 table are one unallocated run.
            if first == Sub::Unalloc && next.is_multiple_of(cov) && self.l2_offset(next / cov)? == 0
            {
                len = len.saturating_add(cov).min(max);
                continue;
            }
            let s = match self.sub_at_cached(next)? {
                Cached::Hit(s) => s,
                Cached::Miss(off) => {
                    stop = Some(off);
                    break;
                }
            };
            let delta = next - guest + guest % g;
            let same = match (first, s) {
                (Sub::Data(a), Sub::Data(b)) | (Sub::ZeroAlloc(a), Sub::ZeroAlloc(b)) => {
                    a.checked_add(delta) == Some(b)
                }
                (Sub::Zero, Sub::Zero) | (Sub::Unalloc, Sub::Unalloc) => true,
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + g).min(max);
        }
        let first = match first {
            Sub::Data(a) => Sub::Data(a + guest % g),
            Sub::ZeroAlloc(a) => Sub::ZeroAlloc(a + guest % g),
            o => o,
        };
        Ok(Cached::Hit((first, len, stop)))
    }

    fn sub_at_cached(&self, guest: u64) -> Result<Cached<Sub>> {
        let (e, b, l2_off) = match self.l2_entry_cached(guest)? {
            Cached::Hit(v) => v,
            Cached::Miss(off) => return Ok(Cached::Miss(off)),
        };
        let sc = u32::try_from((guest % self.cs()) / (self.cs() / 32)).unwrap_or(0);
        classify(&self.h, e, b, sc, l2_off).map(Cached::Hit)
    }

    /// Writes the L1 entry `i` through to disk.
    pub(crate) fn write_l1_entry(&mut self, i: u64, value: u64) -> Result<()> {
        let k = usize::try_from(i).map_err(|_| internal("L1 index"))?;
        let slot = self
            .l1
            .get_mut(k)
            .ok_or(Error::corrupt("qcow2", "L1 index out of range", i))?;
        *slot = value;
        self.file.debug_event(DebugEvent::L1Update);
        self.file
            .write_all_at(&value.to_be_bytes(), self.l1_offset + i * 8)
    }

    /// Remembers `off..off+len` as metadata (bounded: huge hostile tables are skipped).
    pub(crate) fn note_meta(&mut self, kind: MetaKind, off: u64, len: u64) {
        let cs = self.cs();
        self.overlap.note(kind, off, len, cs);
    }

    /// Builds the metadata set from the header and tables (at open).
    pub(crate) fn collect_meta(&mut self) {
        let cs = self.cs();
        self.note_meta(MetaKind::Header, 0, cs);
        self.note_meta(MetaKind::ActiveL1, self.l1_offset, self.l1.len() as u64 * 8);
        self.note_meta(
            MetaKind::RefcountTable,
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * cs,
        );
        let rbs: Vec<u64> = self
            .reftable
            .iter()
            .map(|e| e & crate::disk::table::REFT_OFFSET_MASK)
            .collect();
        let l2s: Vec<u64> = self.l1.iter().map(|e| e & L1E_OFFSET_MASK).collect();
        for (kind, offs) in [(MetaKind::RefcountBlock, rbs), (MetaKind::ActiveL2, l2s)] {
            for o in offs.into_iter().filter(|&o| o != 0) {
                self.note_meta(kind, o, cs);
            }
        }
        if let Some(b) = self.h.ext.bitmaps {
            self.note_meta(
                MetaKind::BitmapDirectory,
                b.directory_offset,
                b.directory_size,
            );
        }
    }

    /// Records L2 updates: the cache sees them at once; storage gets them at the next
    /// [`Meta::commit_deferred`] (guest flush, check, close, or too many pending), after a
    /// storage flush when they point to new clusters. Old allocations in `unref` lose their
    /// reference only after the updates are durable.
    pub(crate) fn defer(
        &mut self,
        l2: Vec<L2Update>,
        unref: Vec<(u64, u64)>,
        new_clusters: bool,
    ) -> Result<()> {
        let ext = self.h.extended_l2();
        for u in &l2 {
            let (t, i, e, b) = (u.table, u.index, u.entry, u.bitmap);
            let tab = self.l2_table(t)?;
            let k = usize::try_from(if ext { i * 2 } else { i }).unwrap_or(usize::MAX);
            if let Some(s) = tab.get_mut(k) {
                *s = e;
            }
            if let Some(s) = tab.get_mut(k + 1).filter(|_| ext) {
                *s = b;
            }
            self.l2.dirty.insert(t);
        }
        self.deferred.add(l2, unref, new_clusters);
        if self.deferred.len() > MAX_DEFERRED || self.l2.dirty.len() > self.l2.dirty_limit() {
            self.write_deferred()?;
        }
        Ok(())
    }

    /// Writes the deferred L2 updates (see [`Meta::defer`]) and gives the reserve back
    /// (see `reserve`): every metadata operation other than guest writes starts here.
    pub(crate) fn commit_deferred(&mut self) -> Result<()> {
        self.release_reserve()?;
        self.write_deferred()?;
        self.write_held()
    }

    /// A guest flush: writes the deferred L2 updates and allocates the next reserve.
    /// Returns the reserve's generation for [`Meta::reserve_flushed`], to call after the
    /// storage flush that must follow.
    pub(crate) fn guest_flush(&mut self) -> Result<u64> {
        self.write_deferred()?;
        self.refill_reserve()
    }

    /// Writes a whole fresh L2 table to `off` and caches it.
    pub(crate) fn write_l2_table(&mut self, off: u64, table: Vec<u64>) -> Result<()> {
        self.file.debug_event(DebugEvent::L2Update);
        self.file.write_all_at(&encode_u64s(&table), off)?;
        self.l2.insert(off, table);
        Ok(())
    }
}

/// Writes `h` as the whole header cluster: fixed fields (unknown fields of a longer v3
/// header kept), the extensions, then the backing file name. Updates the backing name
/// offset and length in `h`.
pub(crate) fn write_header(m: &mut Meta, h: &mut Header) -> Result<()> {
    let cs = m.cs();
    let hlen = if h.version >= 3 {
        u64::from(h.header_length)
    } else {
        u64::from(V2_HEADER_LEN)
    };
    // Unknown bytes of a longer existing header are kept (never more than the new
    // header's length: an upgrade from v2 must not copy old extension bytes).
    let old_hlen = if m.h.version >= 3 {
        u64::from(m.h.header_length)
    } else {
        u64::from(V2_HEADER_LEN)
    };
    let mut buf = m.limits.alloc("qcow2 header", cs)?;
    let keep = buf
        .get_mut(..idx(hlen.min(old_hlen).min(cs)))
        .ok_or(internal("qcow2: header too large"))?;
    read_host(m.file.as_ref(), keep, 0)?;
    let ext = h.ext.serialise(h.version);
    let name = h.backing_file.clone().unwrap_or_default();
    let ext_end = hlen + ext.len() as u64;
    let end = ext_end + name.len() as u64;
    if end > cs {
        return Err(Error::invalid(
            "Cannot update the qcow2 header: the header, its extensions and the backing file \
             name do not fit in the first cluster",
        ));
    }
    if name.is_empty() {
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
    } else {
        h.backing_file_offset = ext_end;
        h.backing_file_size =
            u32::try_from(name.len()).map_err(|_| Error::invalid("backing file name too long"))?;
    }
    // The fixed fields first: with a 104-byte v3 header the compression type byte is
    // not part of the header, the extensions overwrite it.
    if !h.write_fixed(&mut buf) {
        return Err(Error::invalid("qcow2: header does not fit"));
    }
    if hlen < 112
        && let Some(pad) = buf.get_mut(idx(hlen)..idx(112.min(cs)))
    {
        pad.fill(0);
    }
    if let Some(d) = buf.get_mut(idx(hlen)..idx(ext_end)) {
        d.copy_from_slice(&ext);
    }
    if let Some(d) = buf.get_mut(idx(ext_end)..idx(end)) {
        d.copy_from_slice(name.as_bytes());
    }
    m.file.flush()?;
    m.file.write_all_at(&buf, 0)?;
    m.file.flush()?;
    m.h = h.clone();
    Ok(())
}
