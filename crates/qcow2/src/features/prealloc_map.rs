//! Whether an image looks metadata-preallocated (qemu's
//! `qcow2_detect_metadata_preallocation`): many more clusters have a refcount than the
//! file occupies on the host. `map` of such an image asks the file where its holes are
//! (qemu's `BDRV_BLOCK_RECURSE`): a preallocated cluster that was never written reads
//! as zeroes and maps as zero, not as data (iotest 250).

use crate::device::Qcow2Device;

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
fn metadata_preallocated(dev: &Qcow2Device) -> diskimg_blockio::Result<bool> {
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
