//! What the `qemu-img` verbs need beyond guest I/O, built on the device and the metadata
//! engine: `check` (with `check_compare`, `check_copied` and the refcount rebuild),
//! `resize`, `amend` and LUKS `keyslots`, internal snapshots (`snapshot_ops`, with the
//! refcount and COPIED-flag passes in `snapshot_refs`), persistent bitmaps (`bitmap`
//! edits, `dirty` tracking) and chain maintenance (`maint`: rebase, commit's
//! make-empty). Nothing below this layer names these modules.

pub(crate) mod amend;
pub(crate) mod amend_progress;
pub(crate) mod bitmap;
pub(crate) mod bitmap_edit;
pub(crate) mod check;
pub(crate) mod check_compare;
pub(crate) mod check_copied;
pub(crate) mod check_snapshots;
pub(crate) mod dirty;
pub(crate) mod keyslots;
pub(crate) mod maint;
pub(crate) mod prealloc_map;
pub(crate) mod resize;
pub(crate) mod snapshot_ops;
pub(crate) mod snapshot_refs;
pub(crate) mod vmstate;
