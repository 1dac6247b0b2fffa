//! The host epoch ([`BlockDevice::host_epoch`](diskimg_blockio::BlockDevice::host_epoch)):
//! a count, readable without the metadata lock, that moves before any host cluster a
//! layout walk may have reported as a guest range's home can hold anything else.
//!
//! A host cluster becomes another guest range's home (or metadata) only by being
//! allocated again, and the allocator takes only clusters whose refcount is 0. So the
//! count moves wherever a refcount is set to 0 (`Meta::set_refcount`,
//! `Meta::set_refcount_run`; `unref_range`, deferred unreferences, snapshot and bitmap
//! frees, shrinking, compressed copy-on-write and the giving back of unused allocations
//! all go through them) and wherever the refcount structures are replaced wholesale
//! (the rebuild of a repair or of an amend, emptying the image). Every such change
//! happens under the exclusive metadata lock after the L2 updates that stopped
//! referencing the cluster were made in the cache, so a walk (under the shared lock)
//! that reported the cluster as a home ran before the count moved, and a reader that
//! took the count before its walk sees it moved once it read the reused bytes.
//!
//! Not moved: clusters of the write reserve given back (`reserve`: they were never
//! referenced), in-place writes, allocations of fresh clusters, and reads. A snapshot
//! view shares its image's count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The count itself, shared by the device, its metadata and its snapshot views.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostEpoch(Arc<AtomicU64>);

impl HostEpoch {
    /// The current count.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Moves the count (see the module docs for when).
    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
