//! Whether an image looks metadata-preallocated (qemu's
//! `qcow2_detect_metadata_preallocation`): many more clusters have a refcount than the
//! file occupies on the host. `map` of such an image asks the file where its holes are
//! (qemu's `BDRV_BLOCK_RECURSE`): a preallocated cluster that was never written reads
//! as zeroes and maps as data that reads as zeroes (iotest 250). Also here: the host
//! offset `map` reports for unwritten subclusters of an allocated extended-L2 cluster.

use diskimg_blockio::{Error, Result};

use crate::device::Qcow2Device;
use crate::disk::table::{L2E_OFFSET_MASK, OFLAG_COPIED};

impl Qcow2Device {
    /// Whether `map` reports host holes under data clusters as zeroes: decided once per
    /// open image at its first `map`, as qemu decides it once per open.
    pub(crate) fn map_sees_holes(&self) -> bool {
        *self
            .prealloc_map
            .get_or_init(|| metadata_preallocated(self).unwrap_or(false))
    }
}

/// qemu's test: the clusters with a non-zero refcount below the end of the file reach
/// `max(real * 10 / 9, real + 2)`, where `real` is the number of clusters the file
/// occupies on the host. Unknown host usage (storages that cannot say) counts as not
/// preallocated. The count stops at the threshold.
fn metadata_preallocated(dev: &Qcow2Device) -> Result<bool> {
    let Some(real_bytes) = dev.file.allocated_bytes()? else {
        return Ok(false);
    };
    let mut m = dev.lock();
    let cs = m.cs();
    let real = real_bytes / cs;
    let threshold = (real.saturating_mul(10) / 9).max(real.saturating_add(2));
    let end = m.file().len()?.div_ceil(cs);
    let mut count = 0;
    let mut c = 0;
    while c < end && count < threshold {
        if m.refcount(c)? != 0 {
            count += 1;
        }
        c += 1;
    }
    Ok(count >= threshold)
}

impl Qcow2Device {
    /// For `map`: the host offset qemu reports for the unallocated run of `n` bytes at
    /// `guest`, and the run cut where that changes. With extended L2 entries the
    /// unwritten subclusters of an allocated cluster have one (qemu's
    /// `QCOW2_SUBCLUSTER_UNALLOCATED_ALLOC`: the cluster's host offset plus the offset in
    /// it); the run then ends with the cluster. Otherwise the run ends before the next
    /// allocated cluster (at most 65536 clusters are looked at: callers loop).
    pub(crate) fn unallocated_host(&self, guest: u64, n: u64) -> Result<(Option<u64>, u64)> {
        // Standard L2 entries have no such offset: no exclusive lock for them.
        if !self.shared().h().extended_l2() {
            return Ok((None, n));
        }
        let mut m = self.lock();
        let cs = m.cs();
        let cov = m.h().l1_coverage();
        // As `classify`: with a data file, host offset 0 is a cluster too.
        let data_file = m.h().has_data_file();
        let allocated = |e: u64| e & L2E_OFFSET_MASK != 0 || (data_file && e & OFLAG_COPIED != 0);
        let (entry, _, _) = m.l2_entry(guest)?;
        let to_end = cs - guest % cs;
        let host = entry & L2E_OFFSET_MASK;
        if allocated(entry) {
            let at = host
                .checked_add(guest % cs)
                .ok_or_else(|| Error::corrupt("qcow2", "cluster offset overflows", 0))?;
            return Ok((Some(at), n.min(to_end)));
        }
        let mut len = to_end;
        for _ in 0..65536 {
            if len >= n {
                break;
            }
            let next = guest.saturating_add(len);
            let (entry, _, table) = m.l2_entry(next)?;
            if table == 0 {
                // No L2 table: nothing allocated up to the next L1 entry's range.
                len = len.saturating_add(cov - next % cov);
                continue;
            }
            if allocated(entry) {
                break;
            }
            len = len.saturating_add(cs);
        }
        Ok((None, n.min(len)))
    }
}
