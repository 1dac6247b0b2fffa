//! What a device reports about itself: [`DeviceInfo`], check reports, snapshot listings.

/// A reference from an image to the image it is layered on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackingRef {
    /// The name as stored in the image (qemu's "backing-filename").
    pub filename: String,
    /// The backing format the image names, if any ("backing-filename-format").
    pub format: Option<String>,
    /// Further candidate names to try, in order, when `filename` cannot be opened
    /// (VHD/VHDX parent locators store relative and absolute forms).
    pub alternates: Vec<String>,
}

impl BackingRef {
    /// A reference to `filename` with an optional format.
    pub fn new(filename: impl Into<String>, format: Option<String>) -> Self {
        Self {
            filename: filename.into(),
            format,
            alternates: Vec::new(),
        }
    }
}

/// A format-specific value for `info` output (qemu's "format-specific" data), kept
/// independent of any serialisation crate. Maps keep their insertion order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoValue {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<InfoValue>),
    /// An ordered map.
    Map(Vec<(String, InfoValue)>),
}

/// One internal snapshot, as `qemu-img snapshot -l` and `info` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot id (a decimal string in qcow2).
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Size of saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock in nanoseconds at the snapshot.
    pub vm_clock_nsec: u64,
    /// Guest instruction count, if recorded.
    pub icount: Option<u64>,
    /// Virtual disk size at the snapshot.
    pub disk_size: Option<u64>,
}

/// Facts about an open image, as `qemu-img info` reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// qemu's format name: `raw`, `qcow2`, `vmdk`, `vdi`, `vhdx`, `vpc`.
    pub format: &'static str,
    /// Guest size in bytes.
    pub virtual_size: u64,
    /// Allocation unit in bytes (cluster, grain, block), if the format has one.
    pub cluster_size: Option<u64>,
    /// Opened read-only.
    pub read_only: bool,
    /// The image this one is layered on.
    pub backing: Option<BackingRef>,
    /// The image was not closed cleanly (qemu's "dirty-flag").
    pub dirty: bool,
    /// The guest data is encrypted.
    pub encrypted: bool,
    /// qemu's "format-specific" block: the type name and its data map.
    pub format_specific: Option<(&'static str, Vec<(String, InfoValue)>)>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

impl DeviceInfo {
    /// Info with only the format and size set.
    pub fn new(format: &'static str, virtual_size: u64) -> Self {
        Self {
            format,
            virtual_size,
            cluster_size: None,
            read_only: false,
            backing: None,
            dirty: false,
            encrypted: false,
            format_specific: None,
            snapshots: Vec::new(),
        }
    }
}

/// What `check -r` may repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RepairMode {
    /// Only report.
    #[default]
    None,
    /// Fix leaked clusters only.
    Leaks,
    /// Fix everything that can be fixed.
    All,
}

/// The result of a metadata check, in the shape of qemu's `ImageCheck`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Internal errors that stopped parts of the check.
    pub check_errors: u64,
    /// Allocated but unreferenced clusters.
    pub leaks: u64,
    /// Metadata inconsistencies that can lose data.
    pub corruptions: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Clusters in use by the guest.
    pub allocated_clusters: Option<u64>,
    /// Clusters of the virtual disk.
    pub total_clusters: Option<u64>,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: Option<u64>,
    /// Compressed clusters.
    pub compressed_clusters: Option<u64>,
    /// End of the last used host cluster.
    pub image_end_offset: Option<u64>,
    /// Human-readable findings ("ERROR cluster 6 refcount=0 reference=1").
    pub messages: Vec<String>,
}
