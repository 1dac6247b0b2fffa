//! Deciding what to write for one chunk: block status, zero detection, compression
//! units and comparison with the target's backing image. Pure reads of the source.

use std::sync::atomic::{AtomicBool, Ordering};

pub use diskimg_blockio::bytes::is_zero;
use diskimg_blockio::{
    BlockDevice, CompressedUnits, Error, MapEntry, Result, Storage, ZeroFlags, block_status,
    read_from_backing,
};

use crate::options::{ConvertOptions, ConvertStats};
use crate::pool::{Buf, Pool};

/// One write [`crate::convert`] performs on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `data` at `offset`.
    Data {
        /// Guest offset.
        offset: u64,
        /// The bytes.
        data: Buf,
    },
    /// Write whole compression units at `offset`.
    Compressed {
        /// Guest offset (unit-aligned).
        offset: u64,
        /// The units' bytes (a multiple of the unit, or ending with the target's partial
        /// last unit).
        data: Buf,
    },
    /// Store units the target already compressed
    /// ([`compress_units`](BlockDevice::compress_units), done while planning).
    Packed(CompressedUnits),
    /// Copy `len` bytes from the source's
    /// [`data_storage`](BlockDevice::data_storage) at `src_offset` to `offset` with
    /// [`write_from`](BlockDevice::write_from) (copy offloading, qemu-img's `-C`).
    Copy {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Host offset in the source's data storage.
        src_offset: u64,
    },
    /// Make `len` bytes at `offset` read as zeroes.
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Leave `len` bytes untouched (already right in the target).
    Skip {
        /// Length in bytes.
        len: u64,
    },
}

/// What one compression unit of a chunk becomes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Reads as zeroes.
    Zero,
    /// Equal to the target's backing image.
    Skip,
    /// A whole unit to compress.
    Compress,
    /// A partial unit that is not the target's last one, written plainly.
    Plain,
}

/// The shared, read-only state of one conversion.
pub(crate) struct Ctx<'a> {
    pub(crate) src: &'a dyn BlockDevice,
    pub(crate) dst: &'a dyn BlockDevice,
    pub(crate) opts: &'a ConvertOptions,
    /// Compression unit (0 = not compressing).
    pub(crate) unit: u64,
    pub(crate) chunk: u64,
    pub(crate) pool: &'a Pool,
    /// With copy offloading: the source's data storage and its length.
    pub(crate) offload: Option<(&'a dyn Storage, u64)>,
    /// The target compresses ahead of its writes
    /// ([`compress_units`](BlockDevice::compress_units)); cleared when it refuses.
    pub(crate) precompress: AtomicBool,
}

/// Splits `buf` (starting at guest `offset`) into runs `(start, len, zero)`, where a
/// zero run consists of `granule`-aligned blocks (aligned to guest offsets) that are
/// entirely zero. The blocks cut short by the buffer's ends count as well: the head up to
/// the first block boundary and the tail after the last (qemu-img's zero run at the start
/// or the end of its buffer is zero whatever its length). `granule` 0 means no
/// detection: one data run.
pub fn zero_runs(buf: &[u8], offset: u64, granule: u64) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    if buf.is_empty() {
        return out;
    }
    let Ok(g) = usize::try_from(granule) else {
        return vec![(0, buf.len(), false)];
    };
    if g == 0 {
        return vec![(0, buf.len(), false)];
    }
    let mut pos = 0usize;
    while pos < buf.len() {
        let misalign = usize::try_from((offset + pos as u64) % granule).unwrap_or(0);
        let end = (pos + (g - misalign)).min(buf.len());
        // Every piece is a whole block but the first and the last, which may be cut
        // short by the buffer's ends; a zero piece is a zero run either way.
        let zero = is_zero(buf.get(pos..end).unwrap_or(&[]));
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 += end - pos,
            _ => out.push((pos, end - pos, zero)),
        }
        pos = end;
    }
    out
}

impl Ctx<'_> {
    /// The writes for the chunk at `offset` (`len` bytes).
    pub(crate) fn plan(&self, offset: u64, len: u64) -> Result<Vec<Op>> {
        let end = offset + len;
        let mut ops = Vec::new();
        if self.unit > 0 {
            self.plan_units(offset, len, &mut ops)?;
            return Ok(ops);
        }
        let mut pos = offset;
        while pos < end {
            let st = block_status(self.src, pos, end - pos)?;
            if st.zero {
                self.push_zero(pos, st.length, &mut ops)?;
            } else if let Some(src_offset) = self.offload_offset(&st) {
                ops.push(Op::Copy {
                    offset: pos,
                    len: st.length,
                    src_offset,
                });
            } else {
                let mut buf = self.pool.take(st.length)?;
                self.src.read_at(&mut buf, pos)?;
                self.push_data(pos, buf, &mut ops)?;
            }
            pos += st.length;
        }
        Ok(ops)
    }

    /// Where data to offload lives in the source's data storage: plain data of the top
    /// layer, lying inside the storage, and no `-B` comparison to make.
    fn offload_offset(&self, st: &MapEntry) -> Option<u64> {
        let (_, store_len) = self.offload?;
        let host = st.offset?;
        let plain = st.depth == 0 && st.data && !st.compressed && self.opts.backing.is_none();
        (plain && host.checked_add(st.length)? <= store_len).then_some(host)
    }

    /// A chunk of whole compression units (`offset` is unit-aligned): the units that
    /// read as zero become zero ranges, runs of consecutive other units become one
    /// [`Op::Compressed`] each (the device may compress them in parallel), a partial tail
    /// unit is plain data. The chunk is read with one call.
    fn plan_units(&self, offset: u64, len: u64, ops: &mut Vec<Op>) -> Result<()> {
        let end = offset + len;
        // Units that block status already shows as zero need no read at all.
        let mut zero_map: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let st = block_status(self.src, pos, end - pos)?;
            zero_map.push((pos, st.length, st.zero));
            pos += st.length;
        }
        // With -S 0 zero units are compressed too (qemu-img writes compressed clusters
        // for all of the image then).
        let sparse = self.opts.sparse_size > 0;
        if sparse && zero_map.iter().all(|z| z.2) {
            return self.push_zero(offset, len, ops);
        }
        let mut buf = self.pool.take(len)?;
        self.src.read_at(&mut buf, offset)?;
        let unit = usize::try_from(self.unit).map_err(|_| Error::invalid("unit too large"))?;
        // Classify the units.
        let mut kinds: Vec<(u64, usize, usize, Unit)> = Vec::new();
        for (i, piece) in buf.chunks(unit).enumerate() {
            let start = i * unit;
            let off = offset + start as u64;
            let n = piece.len();
            let known_zero = zero_map
                .iter()
                .any(|z| z.2 && z.0 <= off && off + n as u64 <= z.0 + z.1);
            let kind = if sparse && (known_zero || is_zero(piece)) {
                Unit::Zero
            } else if self.equals_backing(piece, off)? {
                Unit::Skip
            } else if n == unit || off + n as u64 == self.dst.virtual_size() {
                // Whole units, and the target's partial last one (zero-padded by the
                // target, as qemu-img compresses it).
                Unit::Compress
            } else {
                Unit::Plain
            };
            kinds.push((off, start, n, kind));
        }
        if kinds.iter().all(|k| k.3 == Unit::Compress) {
            // The common case: the whole buffer is one compressed run, no copy.
            ops.push(Op::Compressed { offset, data: buf });
            return self.precompress(ops);
        }
        for (off, start, n, kind) in kinds {
            let piece = buf.get(start..start + n).unwrap_or(&[]);
            match kind {
                Unit::Zero => self.push_zero(off, n as u64, ops)?,
                Unit::Skip => ops.push(Op::Skip { len: n as u64 }),
                Unit::Plain => ops.push(Op::Data {
                    offset: off,
                    data: self.pool.copy_of(piece)?,
                }),
                Unit::Compress => match ops.last_mut() {
                    Some(Op::Compressed { offset: o, data: d }) if *o + d.len() as u64 == off => {
                        d.extend_from_slice(piece);
                    }
                    _ => ops.push(Op::Compressed {
                        offset: off,
                        data: self.pool.copy_of(piece)?,
                    }),
                },
            }
        }
        self.pool.put(buf);
        self.precompress(ops)
    }

    /// Compresses the runs of `ops` here, on the planning thread, when the target can
    /// ([`compress_units`](BlockDevice::compress_units)): with workers that is on every
    /// core, and the writer (in guest order) only stores the results.
    fn precompress(&self, ops: &mut [Op]) -> Result<()> {
        for op in ops.iter_mut() {
            if !self.precompress.load(Ordering::Relaxed) {
                return Ok(());
            }
            let Op::Compressed { offset, data } = op else {
                continue;
            };
            match self.dst.compress_units(data, *offset) {
                Ok(units) => {
                    self.pool.put(std::mem::take(data));
                    *op = Op::Packed(units);
                }
                Err(Error::Unsupported { .. }) => {
                    self.precompress.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A range the source reads as zeroes.
    fn push_zero(&self, offset: u64, len: u64, ops: &mut Vec<Op>) -> Result<()> {
        if self.opts.sparse_size == 0 {
            // -S 0: fully allocate, zeroes are written as data.
            return self.push_data_raw(offset, self.pool.zeroed(len)?, ops);
        }
        let skip = match &self.opts.backing {
            Some(b) => {
                let mut bb = self.pool.take(len)?;
                read_from_backing(Some(b.as_ref()), &mut bb, offset)?;
                let z = is_zero(&bb);
                self.pool.put(bb);
                z
            }
            None => self.opts.target_is_zero,
        };
        ops.push(if skip {
            Op::Skip { len }
        } else {
            Op::Zero { offset, len }
        });
        Ok(())
    }

    /// Data read from the source: split out zero blocks at `-S` granularity.
    fn push_data(&self, offset: u64, buf: Buf, ops: &mut Vec<Op>) -> Result<()> {
        if self.opts.sparse_size > 0 && is_zero(&buf) {
            // Data that reads as zeroes throughout is sparse whatever its length, as
            // qemu-img's is_allocated_sectors_min takes a leading zero run (here: all).
            let len = buf.len() as u64;
            self.pool.put(buf);
            return self.push_zero(offset, len, ops);
        }
        let runs = zero_runs(&buf, offset, self.opts.sparse_size);
        if runs.len() == 1 && runs.first().is_some_and(|r| !r.2) {
            return self.push_data_raw(offset, buf, ops);
        }
        for (start, n, zero) in runs {
            let off = offset + start as u64;
            if zero {
                self.push_zero(off, n as u64, ops)?;
            } else {
                let piece = self
                    .pool
                    .copy_of(buf.get(start..start + n).unwrap_or(&[]))?;
                self.push_data_raw(off, piece, ops)?;
            }
        }
        self.pool.put(buf);
        Ok(())
    }

    fn push_data_raw(&self, offset: u64, data: Buf, ops: &mut Vec<Op>) -> Result<()> {
        let Some(b) = &self.opts.backing else {
            ops.push(Op::Data { offset, data });
            return Ok(());
        };
        // Compare with the backing image block by block; equal blocks stay unallocated.
        let mut back = self.pool.take(data.len() as u64)?;
        read_from_backing(Some(b.as_ref()), &mut back, offset)?;
        let g = usize::try_from(self.opts.sparse_size.max(512)).unwrap_or(4096);
        let mut pos = 0usize;
        while pos < data.len() {
            let misalign = usize::try_from((offset + pos as u64) % g as u64).unwrap_or(0);
            let end = (pos + g - misalign).min(data.len());
            let same = data.get(pos..end) == back.get(pos..end);
            let n = (end - pos) as u64;
            match (ops.last_mut(), same) {
                (Some(Op::Skip { len }), true) => *len += n,
                (_, true) => ops.push(Op::Skip { len: n }),
                (Some(Op::Data { offset: o, data: d }), false)
                    if *o + d.len() as u64 == offset + pos as u64 =>
                {
                    d.extend_from_slice(data.get(pos..end).unwrap_or(&[]));
                }
                (_, false) => ops.push(Op::Data {
                    offset: offset + pos as u64,
                    data: self.pool.copy_of(data.get(pos..end).unwrap_or(&[]))?,
                }),
            }
            pos = end;
        }
        self.pool.put(back);
        self.pool.put(data);
        Ok(())
    }

    fn equals_backing(&self, data: &[u8], offset: u64) -> Result<bool> {
        let Some(b) = &self.opts.backing else {
            return Ok(false);
        };
        let mut bb = self.pool.take(data.len() as u64)?;
        read_from_backing(Some(b.as_ref()), &mut bb, offset)?;
        let same = *bb == *data;
        self.pool.put(bb);
        Ok(same)
    }
}

/// Performs `ops` on the target, returning what was done.
///
/// A run of several compression units goes to
/// [`write_compressed`](BlockDevice::write_compressed) in one call (the contract takes
/// whole units, so a device can compress them in parallel). A device that refuses more
/// than one unit per call with `InvalidArgument` gets them one by one from then on
/// (`single_units` remembers it across chunks and threads).
pub(crate) fn apply(
    ctx: &Ctx<'_>,
    dst: &dyn BlockDevice,
    ops: Vec<Op>,
    single_units: &AtomicBool,
) -> Result<ConvertStats> {
    let (unit, pool) = (ctx.unit, ctx.pool);
    let mut st = ConvertStats::default();
    for op in ops {
        match op {
            Op::Data { offset, data } => {
                dst.write_at(&data, offset)?;
                st.data_bytes += data.len() as u64;
                pool.put(data);
            }
            Op::Compressed { offset, data } => {
                write_units(dst, &data, offset, unit, single_units)?;
                st.compressed_bytes += data.len() as u64;
                pool.put(data);
            }
            Op::Packed(units) => {
                st.compressed_bytes += units.len;
                dst.write_compressed_units(units)?;
            }
            Op::Copy {
                offset,
                len,
                src_offset,
            } => {
                let (src, _) = ctx
                    .offload
                    .ok_or(Error::invalid("copy without a source storage"))?;
                dst.write_from(offset, len, src, src_offset)?;
                st.offloaded_bytes += len;
            }
            Op::Zero { offset, len } => {
                dst.write_zeroes(offset, len, ZeroFlags { may_unmap: true })?;
                st.zeroed_bytes += len;
            }
            Op::Skip { len } => st.skipped_bytes += len,
        }
    }
    Ok(st)
}

fn write_units(
    dst: &dyn BlockDevice,
    data: &[u8],
    offset: u64,
    unit: u64,
    single_units: &AtomicBool,
) -> Result<()> {
    let multi = data.len() as u64 > unit;
    if !multi || !single_units.load(Ordering::Relaxed) {
        match dst.write_compressed(data, offset) {
            Err(Error::InvalidArgument(_)) if multi => {
                single_units.store(true, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    let u = usize::try_from(unit).map_err(|_| Error::invalid("unit too large"))?;
    let mut off = offset;
    for piece in data.chunks(u.max(1)) {
        dst.write_compressed(piece, off)?;
        off += piece.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_at_granularity() {
        let mut buf = vec![0u8; 16384];
        buf[5000] = 1;
        // blocks: [0,4k) zero, [4k,8k) data, [8k,16k) zero
        assert_eq!(
            zero_runs(&buf, 0, 4096),
            vec![(0, 4096, true), (4096, 4096, false), (8192, 8192, true)]
        );
        // -S 0: no scan
        assert_eq!(zero_runs(&buf, 0, 0), vec![(0, 16384, false)]);
        // misaligned start: a zero head up to the first block boundary is zero (qemu-img's
        // leading zero run), a head with data is data up to the boundary
        assert_eq!(
            zero_runs(&buf[1000..], 1000, 4096)[..2],
            [(0, 3096, true), (3096, 4096, false)]
        );
        assert_eq!(
            zero_runs(&buf[4608..], 4608, 4096)[..2],
            [(0, 3584, false), (3584, 8192, true)]
        );
        // a buffer inside one block, misaligned: zero when it reads as zeroes
        assert_eq!(zero_runs(&[0; 512], 512, 4096), vec![(0, 512, true)]);
        assert_eq!(zero_runs(&[1; 512], 512, 4096), vec![(0, 512, false)]);
        // a zero tail shorter than a block at the end of the buffer: zero (qemu-img
        // leaves an image's short zero tail sparse)
        let mut tail = vec![0u8; 4096 + 2048];
        tail[0] = 1;
        assert_eq!(
            zero_runs(&tail, 0, 4096),
            vec![(0, 4096, false), (4096, 2048, true)]
        );
        tail[5000] = 1;
        assert_eq!(zero_runs(&tail, 0, 4096), vec![(0, 6144, false)]);
    }
}
