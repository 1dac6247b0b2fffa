//! L1/L2 tables (spec "Cluster mapping", "Extended L2 Entries"): entry decoding and a
//! bounded, write-through L2 cache.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use diskimg_blockio::{Error, Result};

use crate::disk::header::Header;

/// L1 entry bits 9–55: L2 table offset.
/// Refcount table entry bits 9–63: refcount block offset.
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bits 9–55: host cluster offset.
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63 of L1/L2 entries: refcount is exactly one.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries: reads as zero.
pub(crate) const OFLAG_ZERO: u64 = 1;

/// What one cluster (or subcluster) of the guest is in this layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub {
    /// Data at this host offset (in the data file when there is one).
    Data(u64),
    /// Reads as zero; host space preallocated at this offset.
    ZeroAlloc(u64),
    /// Reads as zero, no host space.
    Zero,
    /// Defer to the backing image.
    Unalloc,
    /// Compressed: host byte offset and maximum compressed length.
    Compressed(u64, u64),
}

/// Classifies subcluster `sc` (0 for standard entries) of an L2 entry pair, as qemu's
/// `qcow2_get_subcluster_type`. `l2_off` is for error messages.
pub(crate) fn classify(h: &Header, entry: u64, bitmap: u64, sc: u32, l2_off: u64) -> Result<Sub> {
    let bad = |what| Error::corrupt("qcow2", what, l2_off);
    if entry & OFLAG_COMPRESSED != 0 {
        if h.has_data_file() {
            return Err(bad("compressed cluster in an image with a data file"));
        }
        // As qemu, a subcluster bitmap on a compressed entry is ignored by reads and
        // writes (the compressed cluster is used); `check` reports it.
        let x = 62 - (h.cluster_bits - 8);
        let off = entry & ((1u64 << x) - 1);
        let sectors = ((entry & !OFLAG_COMPRESSED & !OFLAG_COPIED) >> x) + 1;
        let len = (sectors * 512).saturating_sub(off & 511);
        return Ok(Sub::Compressed(off, len));
    }
    let off = entry & L2E_OFFSET_MASK;
    let allocated = off != 0 || (h.has_data_file() && entry & OFLAG_COPIED != 0);
    if allocated && off & (h.cluster_size() - 1) != 0 {
        return Err(bad("Cluster allocation offset unaligned"));
    }
    if !h.extended_l2() {
        if entry & OFLAG_ZERO != 0 {
            return Ok(if allocated {
                Sub::ZeroAlloc(off)
            } else {
                Sub::Zero
            });
        }
        return Ok(if allocated {
            Sub::Data(off)
        } else {
            Sub::Unalloc
        });
    }
    let alloc_bit = (bitmap >> sc) & 1 != 0;
    let zero_bit = (bitmap >> (32 + sc)) & 1 != 0;
    if allocated {
        if (bitmap >> 32) & bitmap & 0xffff_ffff != 0 {
            return Err(bad("subcluster both allocated and zero"));
        }
        let sc_off = off + u64::from(sc) * (h.cluster_size() / 32);
        Ok(if alloc_bit {
            Sub::Data(sc_off)
        } else if zero_bit {
            Sub::ZeroAlloc(sc_off)
        } else {
            Sub::Unalloc
        })
    } else {
        if bitmap & 0xffff_ffff != 0 {
            return Err(bad("allocated subclusters in an unallocated cluster"));
        }
        Ok(if zero_bit { Sub::Zero } else { Sub::Unalloc })
    }
}

/// A bounded cache of L2 tables keyed by host offset. Tables holding updates not yet
/// written (see `Meta::commit_deferred`) are pinned: eviction never writes.
///
/// Lookups through a shared reference ([`L2Cache::get`]) record their use with atomics,
/// so readers holding the metadata lock shared keep the LRU order without excluding
/// each other.
#[derive(Debug)]
pub(crate) struct L2Cache {
    tables: HashMap<u64, (Vec<u64>, AtomicU64)>,
    tick: AtomicU64,
    cap: usize,
    /// Tables with deferred updates (never evicted).
    pub(crate) dirty: HashSet<u64>,
}

impl L2Cache {
    /// A cache holding up to `cap` tables (at least 2).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            tables: HashMap::new(),
            tick: AtomicU64::new(0),
            cap: cap.clamp(2, 4096),
            dirty: HashSet::new(),
        }
    }

    /// How many tables may hold deferred updates before they must be written (half the
    /// cache, so clean tables can still be cached).
    pub(crate) fn dirty_limit(&self) -> usize {
        (self.cap / 2).clamp(1, 64)
    }

    /// Marks a table used. A table stamped within the last `cap / 2` ticks keeps its
    /// stamp (an approximate LRU): readers of a hot table then only load shared
    /// counters, so threads do not bounce the counters' cache line on every lookup.
    fn touch(&self, used: &AtomicU64) {
        let now = self.tick.load(Ordering::Relaxed);
        let recent = (self.cap / 2) as u64;
        if used.load(Ordering::Relaxed).saturating_add(recent) >= now {
            return;
        }
        let t = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        used.store(t, Ordering::Relaxed);
    }

    /// The cached table at `off`, marking it used (shared access).
    pub(crate) fn get(&self, off: u64) -> Option<&Vec<u64>> {
        self.tables.get(&off).map(|(v, used)| {
            self.touch(used);
            v
        })
    }

    /// The cached table at `off`, marking it used.
    pub(crate) fn get_mut(&mut self, off: u64) -> Option<&mut Vec<u64>> {
        let t = self.tick.get_mut();
        *t += 1;
        let t = *t;
        self.tables.get_mut(&off).map(|(v, used)| {
            *used.get_mut() = t;
            v
        })
    }

    /// Inserts a table, evicting the least recently used when full.
    pub(crate) fn insert(&mut self, off: u64, table: Vec<u64>) {
        if self.tables.len() >= self.cap && !self.tables.contains_key(&off) {
            let oldest = self
                .tables
                .iter()
                .filter(|(k, _)| !self.dirty.contains(k))
                .min_by_key(|(_, (_, used))| used.load(Ordering::Relaxed))
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.tables.remove(&k);
            }
        }
        let t = self.tick.get_mut();
        *t += 1;
        let used = AtomicU64::new(*t);
        self.tables.insert(off, (table, used));
    }
}

/// Decodes a big-endian table of u64 entries.
pub(crate) fn decode_u64s(buf: &[u8], out: &mut [u64]) {
    for (dst, chunk) in out.iter_mut().zip(buf.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(chunk);
        *dst = u64::from_be_bytes(a);
    }
}

/// Encodes u64 entries big-endian.
pub(crate) fn encode_u64s(vals: &[u64]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_be_bytes()).collect()
}
