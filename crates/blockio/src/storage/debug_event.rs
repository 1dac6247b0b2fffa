//! [`DebugEvent`]: the points inside a format driver where qemu's drivers call
//! `BLKDBG_EVENT(bs->file, …)`, named as qemu's `BlkdebugEvent` (qapi/block-core.json).
//!
//! A format tells its storage of such a point with [`Storage::debug_event`] right before
//! the host I/O the event names (an L2 table load, an L1 entry update, a guest data
//! write, …). Ordinary storages ignore it (the default does nothing: one empty call per
//! event). A test storage such as the CLI's `blkdebug` node uses it to fail the I/O that
//! follows an event, as qemu's blkdebug driver does.
//!
//! [`Storage::debug_event`]: super::Storage::debug_event

macro_rules! events {
    ($($(#[$doc:meta])* $v:ident = $name:literal,)*) => {
        /// A format-internal event (qemu's `BlkdebugEvent`); see the module docs.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum DebugEvent {
            $($(#[$doc])* $v,)*
        }

        impl DebugEvent {
            /// Every event, in qemu's order.
            pub const ALL: &'static [DebugEvent] = &[$(DebugEvent::$v,)*];

            /// qemu's name (`l1_update`, `write_aio`, …).
            pub fn name(self) -> &'static str {
                match self {
                    $(DebugEvent::$v => $name,)*
                }
            }
        }
    };
}

events! {
    /// An L1 table entry is written.
    L1Update = "l1_update",
    /// Growing the L1 table: the new table is allocated.
    L1GrowAllocTable = "l1_grow_alloc_table",
    /// Growing the L1 table: the new table is written.
    L1GrowWriteTable = "l1_grow_write_table",
    /// Growing the L1 table: the header is pointed at the new table.
    L1GrowActivateTable = "l1_grow_activate_table",
    /// An L2 table is read from the file.
    L2Load = "l2_load",
    /// L2 entries are written.
    L2Update = "l2_update",
    /// L2 entries of a compressed cluster are written.
    L2UpdateCompressed = "l2_update_compressed",
    /// A new L2 table's copy source (the old table) is read.
    L2AllocCowRead = "l2_alloc_cow_read",
    /// A new L2 table is written.
    L2AllocWrite = "l2_alloc_write",
    /// Guest data is read from the file.
    ReadAio = "read_aio",
    /// Guest data is read from the backing image.
    ReadBackingAio = "read_backing_aio",
    /// A compressed cluster is read.
    ReadCompressed = "read_compressed",
    /// Guest data is written to the file.
    WriteAio = "write_aio",
    /// A compressed cluster is written.
    WriteCompressed = "write_compressed",
    /// VM state is read.
    VmstateLoad = "vmstate_load",
    /// VM state is written.
    VmstateSave = "vmstate_save",
    /// Copy-on-write: the old data is read.
    CowRead = "cow_read",
    /// Copy-on-write: the data is written.
    CowWrite = "cow_write",
    /// The refcount table is read.
    ReftableLoad = "reftable_load",
    /// The refcount table grows.
    ReftableGrow = "reftable_grow",
    /// A refcount table entry is written.
    ReftableUpdate = "reftable_update",
    /// A refcount block is read.
    RefblockLoad = "refblock_load",
    /// A whole refcount block is written.
    RefblockUpdate = "refblock_update",
    /// Part of a refcount block is written.
    RefblockUpdatePart = "refblock_update_part",
    /// A new refcount block is allocated.
    RefblockAlloc = "refblock_alloc",
    /// A new refcount block is hooked into the refcount table.
    RefblockAllocHookup = "refblock_alloc_hookup",
    /// A new refcount block is written.
    RefblockAllocWrite = "refblock_alloc_write",
    /// Growing the refcount table: the new refcount blocks are written.
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    /// Growing the refcount table: the new table is written.
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    /// Growing the refcount table: the header is pointed at the new table.
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    /// Clusters are allocated.
    ClusterAlloc = "cluster_alloc",
    /// Bytes (a compressed cluster's) are allocated.
    ClusterAllocBytes = "cluster_alloc_bytes",
    /// Clusters are freed.
    ClusterFree = "cluster_free",
    /// Data is handed to the operating system.
    FlushToOs = "flush_to_os",
    /// Data is made durable.
    FlushToDisk = "flush_to_disk",
    /// Read-modify-write: the head is read.
    PwritevRmwHead = "pwritev_rmw_head",
    /// Read-modify-write: after the head was read.
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    /// Read-modify-write: the tail is read.
    PwritevRmwTail = "pwritev_rmw_tail",
    /// Read-modify-write: after the tail was read.
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    /// A write request starts.
    Pwritev = "pwritev",
    /// A zero write request starts.
    PwritevZero = "pwritev_zero",
    /// A write request is done.
    PwritevDone = "pwritev_done",
    /// The image is about to be emptied (`commit`).
    EmptyImagePrepare = "empty_image_prepare",
    /// Shrinking the L1 table: the table is written.
    L1ShrinkWriteTable = "l1_shrink_write_table",
    /// Shrinking the L1 table: the L2 tables are freed.
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    /// A copy-on-read write.
    CorWrite = "cor_write",
    /// Clusters are allocated (the space is reserved).
    ClusterAllocSpace = "cluster_alloc_space",
    /// No event (a rule on it is active from the start).
    None = "none",
}

impl DebugEvent {
    /// The event qemu names `name`, if any.
    pub fn from_name(name: &str) -> Option<DebugEvent> {
        Self::ALL.iter().copied().find(|e| e.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::DebugEvent;

    #[test]
    fn names_round_trip() {
        for e in DebugEvent::ALL {
            assert_eq!(DebugEvent::from_name(e.name()), Some(*e));
        }
        assert_eq!(
            DebugEvent::from_name("l1_grow_write_table"),
            Some(DebugEvent::L1GrowWriteTable)
        );
        assert_eq!(DebugEvent::from_name("l1_grow.write_table"), None);
    }
}
