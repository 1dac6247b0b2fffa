//! [`BackingEpoch`]: the backing device's part of [`BlockDevice::host_epoch`] for a
//! device whose walk reports its backing device's runs for unallocated ranges.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::BlockDevice;

/// Adds the backing device's host epoch to a device's own, and keeps the sum growing
/// when the backing device is replaced ([`BlockDevice::set_backing`]): runs a walk
/// reported in the old one are no longer what unallocated ranges read, and the new
/// one's count may be lower. Without a backing device the answer takes no lock (a
/// detached reader asks twice per request, from every queue thread).
///
/// ```
/// use std::sync::Arc;
/// use diskimg_blockio::{BackingEpoch, BlockDevice};
///
/// let e = BackingEpoch::default();
/// let none = || None::<Arc<dyn BlockDevice>>;
/// assert_eq!(e.host_epoch(7, none), Some(7));
/// // After the backing device (here: none before, none after) was replaced, it moved.
/// e.replaced(None, false);
/// assert_eq!(e.host_epoch(7, none), Some(8));
/// ```
#[derive(Debug, Default)]
pub struct BackingEpoch {
    /// Moves by the old backing device's count plus one at each replacement.
    moves: AtomicU64,
    /// Whether there is a backing device to ask.
    present: AtomicBool,
}

impl BackingEpoch {
    /// For a device created with a backing device already in place (`present`), as a
    /// view sharing its image's.
    pub fn new(present: bool) -> Self {
        Self {
            moves: AtomicU64::new(0),
            present: AtomicBool::new(present),
        }
    }

    /// The host epoch of a device whose own count is `own` over the backing device
    /// `backing` returns (asked only when there is one): `own` plus the backing's count
    /// plus the replacements so far (wrapping); `None` when the backing device cannot
    /// tell.
    pub fn host_epoch(
        &self,
        own: u64,
        backing: impl FnOnce() -> Option<Arc<dyn BlockDevice>>,
    ) -> Option<u64> {
        let base = own.wrapping_add(self.moves.load(Ordering::SeqCst));
        if !self.present.load(Ordering::SeqCst) {
            return Some(base);
        }
        match backing() {
            None => Some(base),
            Some(b) => b.host_epoch().map(|e| base.wrapping_add(e)),
        }
    }

    /// Call after the backing device `old` was replaced (by one when `present`): moves
    /// the count past `old`'s, so that the sum with the new one's is larger than any
    /// sum with `old`'s before.
    pub fn replaced(&self, old: Option<&dyn BlockDevice>, present: bool) {
        let was = old.and_then(BlockDevice::host_epoch).unwrap_or(0);
        self.present.store(present, Ordering::SeqCst);
        self.moves.fetch_add(was.wrapping_add(1), Ordering::SeqCst);
    }
}
