//! Host clusters freed by guest discards and by shrinking are discarded in the image
//! file (holes punched), as qemu passes such frees down (`pass-discard-request` and
//! `QCOW2_DISCARD_ALWAYS`, both on by default): the file's host usage drops (iotest 250).
//! Snapshot operations punch what they free the same way
//! (`features::snapshot_ops`, qemu's `pass-discard-snapshot`), unless opened with
//! `pass-discard-snapshot=off` ([`Meta::set_keep_snapshot_frees`]). Frees of other kinds
//! (copy-on-write, compressed rewrites) leave the file as it is, as qemu's
//! `pass-discard-other` default does.
//!
//! Crash consistency: a cluster is punched only after the L2 updates that stopped
//! referencing it are durable and its refcount dropped to 0 (see
//! [`Meta::punch_when_freed`]); a crash then leaks it at worst, never exposes zeroes
//! through a live mapping.

use crate::engine::meta::Meta;

impl Meta {
    /// `pass-discard-snapshot=off` (qemu's runtime option): clusters snapshot
    /// operations free stay in the file unpunched.
    pub(crate) fn set_keep_snapshot_frees(&mut self, on: bool) {
        self.keep_snapshot_frees = on;
    }

    /// Whether snapshot operations leave what they free unpunched (see
    /// [`Meta::set_keep_snapshot_frees`]).
    pub(crate) fn keep_snapshot_frees(&self) -> bool {
        self.keep_snapshot_frees
    }

    /// The host ranges `ranges` (the deferred unreferences of a discard or shrink) are
    /// punched in the image file once the deferred L2 updates are written and the
    /// ranges' clusters are free (refcount 0).
    pub(crate) fn punch_when_freed(&mut self, ranges: &[(u64, u64)]) {
        if self.data.is_none() {
            self.deferred.add_punch(ranges);
        }
    }

    /// Punches the whole clusters of `ranges` whose refcount is 0, in contiguous runs.
    /// Discard is a hint: failures are ignored, as qemu ignores them.
    pub(crate) fn punch_freed(&mut self, ranges: Vec<(u64, u64)>) {
        let cs = self.cs();
        let mut clusters: Vec<u64> = Vec::new();
        for (off, len) in ranges {
            if len == 0 {
                continue;
            }
            for c in off / cs..=(off + len - 1) / cs {
                if matches!(self.refcount(c), Ok(0)) {
                    clusters.push(c);
                }
            }
        }
        clusters.sort_unstable();
        clusters.dedup();
        // Contiguous runs: (first cluster, count).
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in clusters {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        for (first, n) in runs {
            let _ = self.file.discard(first * cs, n * cs);
        }
    }
}
