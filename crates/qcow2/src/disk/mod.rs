//! The on-disk structures, parsed and serialised (qcow2 spec sections "Header", "Header
//! extensions", "Cluster mapping", "Snapshots", "Compressed clusters"): no I/O beyond
//! what a caller hands in, and nothing above this layer is named here.

pub(crate) mod bitmap_dir;
pub(crate) mod compress;
pub(crate) mod ext;
pub(crate) mod header;
pub(crate) mod snapshot;
pub(crate) mod table;

/// `v` as an index (`usize::MAX` when it does not fit, which no slice reaches).
pub(crate) fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}
