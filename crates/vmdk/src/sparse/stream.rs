//! The stream-optimized writer (VMware "Virtual Disk Format 5.0" §"Stream-Optimized
//! Compressed Sparse Extents"): whole grains deflated into records (marker with the
//! grain's LBA and the stream's size, zlib stream, padding to a sector) and appended.
//!
//! Two steps, so that a caller can deflate on many threads and still append in guest
//! order: [`SparseExtent::compress_grains`] touches nothing, and
//! [`SparseExtent::append_records`] appends a run of records with one write and one
//! flush before the grain tables point at them.

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{Error, Result};

use super::{Grain, MARKER_LEN, SparseExtent};
use crate::header::SECTOR;

fn refused() -> Error {
    Error::invalid("Could not write to allocated cluster for streamOptimized")
}

impl SparseExtent {
    /// The records of the whole grains in `data`, the first being grain `first` (a
    /// partial last grain is padded with zeroes).
    pub(crate) fn compress_grains(&self, first: u64, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let gb = usize::try_from(self.grain_bytes()).map_err(|_| Error::internal("grain size"))?;
        let mut padded = Vec::new();
        let mut out = Vec::new();
        for (i, piece) in data.chunks(gb.max(1)).enumerate() {
            let grain = if piece.len() == gb {
                piece
            } else {
                padded.clear();
                padded.extend_from_slice(piece);
                padded.resize(gb, 0);
                padded.as_slice()
            };
            out.push(self.compress_record(first + i as u64, grain)?);
        }
        Ok(out)
    }

    /// Checks that `rec` is a record this extent made for `grain`.
    fn check_record(&self, grain: u64, rec: &[u8]) -> Result<()> {
        let bad = || Error::invalid("vmdk: not a grain record of this image");
        let len = rec.len() as u64;
        if len < MARKER_LEN || !len.is_multiple_of(SECTOR) {
            return Err(bad());
        }
        let lba = rec.le_u64(0).ok_or_else(bad)?;
        let size = u64::from(rec.le_u32(8).ok_or_else(bad)?);
        if Some(lba) != grain.checked_mul(self.grain_sectors) || size == 0 || size > len - 12 {
            return Err(bad());
        }
        Ok(())
    }

    /// Appends the records of grains `first..` in order: one write, one flush, then
    /// the grain tables. Refuses (before writing) when a grain is allocated.
    pub(crate) fn append_records(&self, first: u64, records: &[Vec<u8>]) -> Result<()> {
        let mut total = 0u64;
        for (i, rec) in records.iter().enumerate() {
            self.check_record(first + i as u64, rec)?;
            total += rec.len() as u64;
        }
        let mut st = self.lock();
        for i in 0..records.len() as u64 {
            if !matches!(
                self.lookup_locked(&mut st, first + i)?,
                Grain::Unallocated | Grain::Zero
            ) {
                return Err(refused());
            }
        }
        let start = self.alloc(&mut st, total / SECTOR)?;
        let mut run = Vec::new();
        for rec in records {
            run.extend_from_slice(rec);
        }
        self.storage.write_all_at(&run, start * SECTOR)?;
        self.storage.flush()?;
        let mut sector = start;
        for (i, rec) in records.iter().enumerate() {
            let s = u32::try_from(sector).map_err(|_| Error::internal("grain offset"))?;
            self.set_gte(&mut st, first + i as u64, s)?;
            sector += rec.len() as u64 / SECTOR;
        }
        Ok(())
    }

    /// Writes whole grains compressed (unallocated grains only), the first being grain
    /// `first`: deflated on up to all cores, then appended in order.
    pub(crate) fn write_compressed(&self, first: u64, data: &[u8]) -> Result<()> {
        let gb = usize::try_from(self.grain_bytes()).map_err(|_| Error::internal("grain size"))?;
        let grains = data.len().div_ceil(gb.max(1));
        let threads = std::thread::available_parallelism()
            .map(std::num::NonZeroUsize::get)
            .unwrap_or(1)
            .clamp(1, grains.max(1));
        let per = grains.div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<Vec<u8>>>> = std::thread::scope(|sc| {
            let handles: Vec<_> = data
                .chunks(per * gb.max(1))
                .enumerate()
                .map(|(k, part)| {
                    sc.spawn(move || self.compress_grains(first + (k * per) as u64, part))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::internal("deflate thread failed")))
                })
                .collect()
        });
        let mut records = Vec::new();
        for p in parts {
            records.extend(p?);
        }
        self.append_records(first, &records)
    }
}
