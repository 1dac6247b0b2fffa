//! [`BackingEpoch`]: the backing device's part of [`BlockDevice::host_epoch`] for a
//! device whose walk reports its backing device's runs for unallocated ranges.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::BlockDevice;

/// Adds the backing device's host epoch to a device's own, and keeps the sum growing
/// when the backing device is replaced ([`BlockDevice::set_backing`]): runs a walk
/// reported in the old one are no longer what unallocated ranges read, and the new
/// one's count may be lower.
///
/// ```
/// use std::sync::Arc;
/// use diskimg_blockio::{BackingEpoch, BlockDevice};
///
/// let e = BackingEpoch::default();
/// assert_eq!(e.host_epoch(7, None), Some(7));
/// // After the backing device (here: none before) was replaced, the count moved.
/// e.replaced(None);
/// assert_eq!(e.host_epoch(7, None), Some(8));
/// ```
#[derive(Debug, Default)]
pub struct BackingEpoch(AtomicU64);

impl BackingEpoch {
    /// The host epoch of a device whose own count is `own` over `backing`: `own` plus
    /// the backing's count plus the replacements so far (wrapping); `None` when the
    /// backing device cannot tell.
    pub fn host_epoch(&self, own: u64, backing: Option<&dyn BlockDevice>) -> Option<u64> {
        let base = own.wrapping_add(self.0.load(Ordering::SeqCst));
        match backing {
            None => Some(base),
            Some(b) => b.host_epoch().map(|e| base.wrapping_add(e)),
        }
    }

    /// Call after the backing device `old` was replaced: moves the count past `old`'s,
    /// so that the sum with the new one's is larger than any sum with `old`'s before.
    pub fn replaced(&self, old: Option<&dyn BlockDevice>) {
        let was = old.and_then(BlockDevice::host_epoch).unwrap_or(0);
        self.0.fetch_add(was.wrapping_add(1), Ordering::SeqCst);
    }
}
