//! qemu's metadata overlap check ([`Overlap`]): the host clusters that hold metadata
//! (header, L1/L2 and refcount tables, snapshot tables), so that a guest data write
//! landing on one fails instead of destroying the image.

use std::collections::HashSet;

/// The set of host cluster indexes holding metadata (bounded: huge hostile tables are
/// only partly remembered).
#[derive(Debug, Default)]
pub(crate) struct Overlap {
    clusters: HashSet<u64>,
}

impl Overlap {
    /// Remembers `off..off+len` (clusters of `cs` bytes) as metadata.
    pub(crate) fn note(&mut self, off: u64, len: u64, cs: u64) {
        if len == 0 || self.clusters.len() > 1 << 20 {
            return;
        }
        let last = off.saturating_add(len - 1) / cs;
        for c in off / cs..=last.min(off / cs + (1 << 16)) {
            self.clusters.insert(c);
        }
    }

    /// Cluster `c` no longer holds metadata (it was freed).
    pub(crate) fn forget(&mut self, c: u64) {
        self.clusters.remove(&c);
    }

    /// Forgets everything (before the set is built again).
    pub(crate) fn clear(&mut self) {
        self.clusters.clear();
    }

    /// Whether `host..host+len` (non-empty) touches a metadata cluster.
    pub(crate) fn hits(&self, host: u64, len: u64, cs: u64) -> bool {
        (host / cs..=(host + len - 1) / cs).any(|c| self.clusters.contains(&c))
    }
}
