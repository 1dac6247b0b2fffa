//! Targets that are not seekable: an image written front to back to any [`Write`]
//! (stdout), as raw bytes, a fixed VHD (raw bytes, then [`finish_vhd_fixed`]), or qcow2 in the
//! layout of qemu's `scripts/qcow2-to-stdout.py`.
//!
//! qcow2 can only be written front to back when all its metadata is known before the
//! first data cluster: a first pass over the source's map (reading data to drop clusters
//! that are all zeroes) finds the clusters to store; then the header, refcount table,
//! refcount blocks (16-bit, every used cluster referenced once), L1 table and the L2
//! tables that are needed are written, then the data clusters in guest order. The
//! source is read twice, so it must be seekable. Nothing marks an image complete but its
//! last byte: a failure stops the output short (a VHD without its footer).

use std::io::Write;

use diskimg_blockio::{BlockDevice, Error, Result, block_status};

/// Bytes per read.
const CHUNK: u64 = 4 << 20;

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

fn out_err(e: std::io::Error) -> Error {
    Error::io("could not write the output", e)
}

fn write_zeroes(out: &mut dyn Write, mut len: u64) -> Result<()> {
    while len > 0 {
        let n = usize::try_from(len.min(ZEROS.len() as u64)).unwrap_or(ZEROS.len());
        out.write_all(ZEROS.get(..n).unwrap_or_default())
            .map_err(out_err)?;
        len -= n as u64;
    }
    Ok(())
}

/// Writes the guest bytes `[0, end())` of `dev` in order. `end` is asked again after
/// every piece (a stream of unknown length learns its end while being read); zero
/// ranges are written without being read.
pub fn write_raw(
    dev: &dyn BlockDevice,
    out: &mut dyn Write,
    end: &dyn Fn() -> u64,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let mut pos = 0u64;
    let mut buf = Vec::new();
    while pos < end() {
        let st = block_status(dev, pos, dev.virtual_size() - pos)?;
        let len = st.length.min(CHUNK).min(end().saturating_sub(pos)).max(1);
        if st.zero {
            write_zeroes(out, len)?;
        } else {
            buf.resize(usize::try_from(len).unwrap_or(0), 0);
            dev.read_at(&mut buf, pos)?;
            let keep = usize::try_from(len.min(end().saturating_sub(pos))).unwrap_or(0);
            out.write_all(buf.get(..keep).unwrap_or_default())
                .map_err(out_err)?;
        }
        pos += len;
        progress(pos);
    }
    Ok(pos.min(end()))
}

/// A bit per guest cluster: stored in the qcow2 output or not.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64) -> Self {
        Bits(vec![0; usize::try_from(n.div_ceil(64)).unwrap_or(0)])
    }
    fn set(&mut self, i: u64) {
        if let Some(w) = self
            .0
            .get_mut(usize::try_from(i / 64).unwrap_or(usize::MAX))
        {
            *w |= 1 << (i % 64);
        }
    }
    fn get(&self, i: u64) -> bool {
        self.0
            .get(usize::try_from(i / 64).unwrap_or(usize::MAX))
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Pass one: which clusters hold something other than zeroes.
fn scan(dev: &dyn BlockDevice, cs: u64, size: u64, clusters: u64) -> Result<Bits> {
    let mut bits = Bits::new(clusters);
    let mut buf = Vec::new();
    let mut pos = 0;
    while pos < size {
        let st = block_status(dev, pos, size - pos)?;
        let end = pos + st.length;
        if st.zero {
            pos = end;
            continue;
        }
        // Whole clusters touching this extent, in chunks.
        let mut c = pos / cs;
        while c * cs < end {
            let n = (CHUNK / cs).max(1).min(end.div_ceil(cs) - c);
            let start = c * cs;
            let len = (n * cs).min(size - start);
            buf.resize(usize::try_from(len).unwrap_or(0), 0);
            dev.read_at(&mut buf, start)?;
            for (i, piece) in buf.chunks(usize::try_from(cs).unwrap_or(1)).enumerate() {
                if !diskimg_convert::is_zero(piece) {
                    bits.set(c + i as u64);
                }
            }
            c += n;
        }
        pos = end;
    }
    Ok(bits)
}

/// Writes `dev` as a qcow2 v3 image, front to back (see the module docs).
pub fn write_qcow2(
    dev: &dyn BlockDevice,
    out: &mut dyn Write,
    cluster_bits: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let q = QcowPlan::new(dev, cluster_bits)?;
    out.write_all(&q.header()?).map_err(out_err)?;
    q.write_tables(out)?;
    q.write_data(dev, out, progress)?;
    out.flush().map_err(out_err)
}

/// `OFLAG_COPIED` of L1 and L2 entries (the refcount is exactly 1).
const COPIED: u64 = 1 << 63;

/// Where everything of a front-to-back qcow2 goes: the clusters to store (from the
/// first pass) and the offsets of the header, refcount table and blocks, L1, the L2
/// tables in use and the data, in that order.
struct QcowPlan {
    cluster_bits: u32,
    /// Cluster size.
    cs: u64,
    /// Virtual size (a multiple of 512).
    size: u64,
    clusters: u64,
    /// Entries of an L2 table or the refcount table per cluster.
    per_table: u64,
    l1_entries: u64,
    /// Guest clusters holding data.
    bits: Bits,
    /// Number of data clusters.
    data: u64,
    /// Which L2 tables are needed.
    l2_used: Vec<bool>,
    /// Refcount blocks and refcount table clusters.
    blocks: u64,
    tables: u64,
    /// Every cluster of the file (refcounts of 1).
    total: u64,
    rt_off: u64,
    rb_off: u64,
    l1_off: u64,
    l2_off: u64,
    data_off: u64,
}

impl QcowPlan {
    /// The first pass: reads `dev` for its data clusters and lays the file out.
    fn new(dev: &dyn BlockDevice, cluster_bits: u32) -> Result<Self> {
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::invalid(
                "cluster size must be a power of two from 512 to 2 MiB",
            ));
        }
        let cs = 1u64 << cluster_bits;
        let size = dev.virtual_size().next_multiple_of(512);
        let clusters = size.div_ceil(cs);
        let per_table = cs / 8;
        let l1_entries = clusters.div_ceil(per_table);
        if l1_entries * 8 > 32 << 20 {
            return Err(Error::invalid(
                "image too large for this cluster size (L1 table over 32 MiB)",
            ));
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let bits = scan(dev, cs, dev.virtual_size(), clusters)?;
        let data: u64 = bits.0.iter().map(|w| u64::from(w.count_ones())).sum();
        let l2_used: Vec<bool> = (0..l1_entries)
            .map(|t| (t * per_table..((t + 1) * per_table).min(clusters)).any(|c| bits.get(c)))
            .collect();
        let l2_tables = l2_used.iter().filter(|&&u| u).count() as u64;
        // Refcount blocks cover every used cluster, themselves and the table included.
        let per_block = cs * 8 / 16;
        let base = 1 + l1_clusters + l2_tables + data;
        let (mut blocks, mut tables) = (0u64, 0u64);
        loop {
            let total = base + blocks + tables;
            let b = total.div_ceil(per_block);
            let t = b.div_ceil(per_table);
            if b == blocks && t == tables {
                break;
            }
            (blocks, tables) = (b, t);
        }
        let rt_off = cs;
        let rb_off = rt_off + tables * cs;
        let l1_off = rb_off + blocks * cs;
        let l2_off = l1_off + l1_clusters * cs;
        Ok(QcowPlan {
            cluster_bits,
            cs,
            size,
            clusters,
            per_table,
            l1_entries,
            bits,
            data,
            l2_used,
            blocks,
            tables,
            total: base + blocks + tables,
            rt_off,
            rb_off,
            l1_off,
            l2_off,
            data_off: l2_off + l2_tables * cs,
        })
    }

    /// The header cluster (qcow2 v3, 112 bytes, no extensions).
    fn header(&self) -> Result<Vec<u8>> {
        let mut cluster = vec![0u8; usize::try_from(self.cs).unwrap_or(0)];
        let l1_size = u32::try_from(self.l1_entries).map_err(|_| Error::invalid("L1 too large"))?;
        let rt_clusters =
            u32::try_from(self.tables).map_err(|_| Error::invalid("refcount table too large"))?;
        let l1_off = if self.l1_entries > 0 { self.l1_off } else { 0 };
        put(&mut cluster, 0, b"QFI\xfb");
        put(&mut cluster, 4, &3u32.to_be_bytes());
        put(&mut cluster, 20, &self.cluster_bits.to_be_bytes());
        put(&mut cluster, 24, &self.size.to_be_bytes());
        put(&mut cluster, 36, &l1_size.to_be_bytes());
        put(&mut cluster, 40, &l1_off.to_be_bytes());
        put(&mut cluster, 48, &self.rt_off.to_be_bytes());
        put(&mut cluster, 56, &rt_clusters.to_be_bytes());
        put(&mut cluster, 96, &4u32.to_be_bytes());
        put(&mut cluster, 100, &112u32.to_be_bytes());
        Ok(cluster)
    }

    fn l2_is_used(&self, t: u64) -> bool {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.l2_used.get(i))
            .copied()
            .unwrap_or(false)
    }

    /// Refcount table, refcount blocks, L1, then the L2 tables in use.
    fn write_tables(&self, out: &mut dyn Write) -> Result<()> {
        let cs = self.cs;
        emit_entries(out, cs, self.blocks, 8, &|i| self.rb_off + i * cs)?;
        emit_entries(out, cs, self.total, 2, &|_| 1)?;
        let mut l2_index = vec![0u64; self.l2_used.len()];
        let mut n = 0;
        for (t, used) in self.l2_used.iter().enumerate() {
            if *used {
                if let Some(x) = l2_index.get_mut(t) {
                    *x = n;
                }
                n += 1;
            }
        }
        let l1_value = |t: u64| {
            let i = usize::try_from(t).unwrap_or(usize::MAX);
            if self.l2_is_used(t) {
                (self.l2_off + l2_index.get(i).copied().unwrap_or(0) * cs) | COPIED
            } else {
                0
            }
        };
        let l1_len = self.l1_entries.div_ceil(self.per_table) * self.per_table;
        emit_entries(out, cs, l1_len, 8, &l1_value)?;
        let mut cluster = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        let mut next_data = self.data_off;
        for t in (0..self.l1_entries).filter(|&t| self.l2_is_used(t)) {
            cluster.fill(0);
            for j in 0..self.per_table {
                let c = t * self.per_table + j;
                if c < self.clusters && self.bits.get(c) {
                    put(&mut cluster, j * 8, &(next_data | COPIED).to_be_bytes());
                    next_data += cs;
                }
            }
            out.write_all(&cluster).map_err(out_err)?;
        }
        Ok(())
    }

    /// The data clusters in guest order, contiguous runs read at once (the second pass).
    fn write_data(
        &self,
        dev: &dyn BlockDevice,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let (cs, clusters, bits) = (self.cs, self.clusters, &self.bits);
        let vsize = dev.virtual_size();
        let mut buf = Vec::new();
        let mut c = 0;
        let mut done = 0;
        while c < clusters {
            if !bits.get(c) {
                c += 1;
                continue;
            }
            let mut e = c + 1;
            while e < clusters && bits.get(e) && (e - c) * cs < CHUNK {
                e += 1;
            }
            let start = c * cs;
            let len = (e - c) * cs;
            buf.resize(usize::try_from(len).unwrap_or(0), 0);
            let avail = usize::try_from(len.min(vsize - start)).unwrap_or(0);
            let (head, tail) = buf.split_at_mut(avail);
            dev.read_at(head, start)?;
            tail.fill(0);
            out.write_all(&buf).map_err(out_err)?;
            done += len;
            progress(done, self.data * cs);
            c = e;
        }
        Ok(())
    }
}

/// Copies `v` to byte `at` of `c` (ignored if it does not fit).
fn put(c: &mut [u8], at: u64, v: &[u8]) {
    let at = usize::try_from(at).unwrap_or(usize::MAX);
    if let Some(d) = c.get_mut(at..at.saturating_add(v.len())) {
        d.copy_from_slice(v);
    }
}

/// Writes `count` big-endian entries of `width` bytes (`value(i)`), in whole clusters of
/// `cs` bytes padded with zeroes.
fn emit_entries(
    out: &mut dyn Write,
    cs: u64,
    count: u64,
    width: u64,
    value: &dyn Fn(u64) -> u64,
) -> Result<()> {
    let mut cluster = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    let per = cs / width;
    let w = usize::try_from(width).unwrap_or(8);
    let mut i = 0;
    while i < count.div_ceil(per) * per {
        cluster.fill(0);
        for j in (0..per).filter(|j| i + j < count) {
            let bytes = value(i + j).to_be_bytes();
            put(
                &mut cluster,
                j * width,
                bytes.get(8 - w..).unwrap_or_default(),
            );
        }
        out.write_all(&cluster).map_err(out_err)?;
        i += per;
    }
    Ok(())
}

/// Ends a fixed VHD whose `written` guest bytes are already out: zero padding up to the
/// size the footer describes, then the footer (creator `qem2`, as qemu-img). With
/// `force_size` the size is kept exact (in sectors, maximum geometry); `azure_align`
/// first rounds it up to whole MiB (what Azure requires) and implies `force_size`;
/// otherwise it is rounded up to a CHS geometry, as qemu-img create does. Returns the
/// virtual size.
pub fn finish_vhd_fixed(
    out: &mut dyn Write,
    written: u64,
    force_size: bool,
    azure_align: bool,
) -> Result<u64> {
    use diskimg_vhd::footer::{DiskType, Footer, VHD_EPOCH, rounded_size};
    let mut size = written.next_multiple_of(512);
    if azure_align {
        size = size.next_multiple_of(1 << 20);
    }
    let (geometry, sectors) = rounded_size(size, force_size || azure_align)?;
    let total = sectors * 512;
    if total < written {
        return Err(Error::invalid("image too large for a VHD"));
    }
    write_zeroes(out, total - written)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let timestamp = u32::try_from(now.saturating_sub(VHD_EPOCH)).unwrap_or(0);
    let mut uuid = [0u8; 16];
    for half in uuid.chunks_mut(8) {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(now);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    let footer = Footer::build(DiskType::Fixed, total, geometry, *b"qem2", timestamp, uuid);
    out.write_all(&footer.raw).map_err(out_err)?;
    out.flush().map_err(out_err)?;
    Ok(total)
}
