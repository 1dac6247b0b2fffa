//! qemu's metadata overlap check ([`Overlap`]): the host clusters that hold metadata
//! (header, L1/L2 and refcount tables, snapshot tables, bitmap directory), so that an
//! allocation or a write landing on one (corrupt refcounts) fails and marks the image
//! corrupt, as qemu's `qcow2_pre_write_overlap_check` does, instead of destroying it.

use std::collections::HashMap;

use diskimg_blockio::{Error, Result};

use crate::disk::header::{INCOMPAT_CORRUPT, INCOMPATIBLE_AT};
use crate::engine::meta::Meta;

/// What a metadata cluster holds, in qemu's overlap-check order (the first one is
/// named when a write touches several).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MetaKind {
    /// The header cluster (and the LUKS header area of encrypted images).
    Header,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table of the active L1.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
    /// The bitmap directory.
    BitmapDirectory,
}

impl MetaKind {
    /// qemu's name (`metadata_ol_names`).
    pub(crate) fn qemu_name(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2_header",
            MetaKind::ActiveL1 => "active L1 table",
            MetaKind::ActiveL2 => "active L2 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::SnapshotTable => "snapshot table",
            MetaKind::InactiveL1 => "inactive L1 table",
            MetaKind::BitmapDirectory => "bitmap directory",
        }
    }
}

/// The host cluster indexes holding metadata, with what they hold (bounded: huge
/// hostile tables are only partly remembered).
#[derive(Debug, Default)]
pub(crate) struct Overlap {
    clusters: HashMap<u64, MetaKind>,
    /// With qemu's inactive-L2 overlap check on (`overlap-check.inactive-l2=on`), a
    /// snapshot whose L1 table cannot be read: qemu's every check then fails with the
    /// errno of its `qcow2_validate_table` (what [`Overlap::break_with`] set).
    broken: Option<i32>,
    /// An allocation failed that way: qemu's refcount cache was left dirty, and its
    /// write-back at close fails the same way.
    broken_alloc: bool,
}

impl Overlap {
    /// Remembers `off..off+len` (clusters of `cs` bytes) as metadata of `kind`.
    pub(crate) fn note(&mut self, kind: MetaKind, off: u64, len: u64, cs: u64) {
        if len == 0 || self.clusters.len() > 1 << 20 {
            return;
        }
        let last = off.saturating_add(len - 1) / cs;
        for c in off / cs..=last.min(off / cs + (1 << 16)) {
            let k = self.clusters.entry(c).or_insert(kind);
            *k = (*k).min(kind);
        }
    }

    /// Clusters `c..c+n` no longer hold metadata (they were freed).
    pub(crate) fn forget(&mut self, c: u64, n: u64) {
        if n > self.clusters.len() as u64 {
            self.clusters.retain(|&x, _| x < c || x - c >= n);
        } else {
            for x in c..c.saturating_add(n) {
                self.clusters.remove(&x);
            }
        }
    }

    /// Every check fails with `errno` from now on (see [`Overlap::broken`]).
    pub(crate) fn break_with(&mut self, errno: i32) {
        self.broken = Some(errno);
    }

    /// The failure of a broken check ([`Overlap::break_with`]), if it is broken.
    fn broken_error(&self, what: &'static str) -> Option<Error> {
        self.broken
            .map(|n| Error::io(what, std::io::Error::from_raw_os_error(n)))
    }

    /// After an allocation failed its broken check, the close's failure (qemu's
    /// refcount cache write-back runs the same check).
    pub(crate) fn close_error(&self) -> Option<Error> {
        self.broken_error("Failed to flush the refcount block cache")
            .filter(|_| self.broken_alloc)
    }

    /// Forgets everything (before the set is built again).
    pub(crate) fn clear(&mut self) {
        self.clusters.clear();
    }

    /// The first (in qemu's order) kind of metadata `host..host+len` (non-empty)
    /// touches, if any.
    pub(crate) fn hits(&self, host: u64, len: u64, cs: u64) -> Option<MetaKind> {
        let (first, last) = (host / cs, (host + len - 1) / cs);
        if last - first >= self.clusters.len() as u64 {
            return (self.clusters.iter())
                .filter(|&(&c, _)| c >= first && c <= last)
                .map(|(_, &k)| k)
                .min();
        }
        (first..=last)
            .filter_map(|c| self.clusters.get(&c).copied())
            .min()
    }
}

impl Meta {
    /// qemu's pre-write overlap check for a guest data write at `host`: refused (and the
    /// image marked corrupt) when it would land on metadata. Writes into an external
    /// data file cannot.
    pub(crate) fn check_overlap(&mut self, host: u64, len: u64) -> Result<()> {
        if self.data.is_some() {
            return Ok(());
        }
        self.refuse_on_metadata(host, len)
    }

    /// Whether a guest data write at `host` would fail [`Meta::check_overlap`] (shared
    /// access: the in-place overwrites under the shared lock leave a hit to the
    /// exclusive path, which reports it).
    pub(crate) fn overlaps_metadata(&self, host: u64, len: u64) -> bool {
        self.data.is_none() && len != 0 && self.overlap.hits(host, len, self.cs()).is_some()
    }

    /// A write of `len` bytes at `host` in the image file: refused with
    /// [`Error::Corrupt`] (and the image marked corrupt) when it touches live metadata.
    pub(crate) fn refuse_on_metadata(&mut self, host: u64, len: u64) -> Result<()> {
        if let Some(e) = self
            .overlap
            .broken_error("overlap check of the inactive L2 tables")
        {
            return Err(e);
        }
        if len == 0 {
            return Ok(());
        }
        match self.overlap.hits(host, len, self.cs()) {
            None => Ok(()),
            Some(k) => Err(self.corruption(
                format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    k.qemu_name()
                ),
                host,
            )),
        }
    }

    /// qemu's check before the bitmap directory is rewritten in place at `off`
    /// (`bitmap_list_store`, which ignores only the directory itself): refused, and the
    /// image marked corrupt, when the directory shares a cluster with other metadata.
    pub(crate) fn refuse_directory_in_place(&mut self, off: u64, len: u64) -> Result<()> {
        match (len > 0).then(|| self.overlap.hits(off, len, self.cs())) {
            Some(Some(k)) if k != MetaKind::BitmapDirectory => Err(self.corruption(
                format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    k.qemu_name()
                ),
                off,
            )),
            _ => Ok(()),
        }
    }

    /// A new allocation of `n` clusters at cluster `c` (corrupt refcounts can place it
    /// anywhere): refused like qemu when it is at offset 0 (`what` names the structure,
    /// qemu's "Preventing invalid allocation of L2 table at offset 0") or on metadata.
    pub(crate) fn refuse_bad_alloc(&mut self, c: u64, n: u64, what: Option<&str>) -> Result<()> {
        if let (0, Some(w)) = (c, what) {
            let msg = format!("Preventing invalid allocation of {w} at offset 0");
            return Err(self.corruption(msg, 0));
        }
        let cs = self.cs();
        self.overlap.broken_alloc |= self.overlap.broken.is_some();
        self.refuse_on_metadata(c.saturating_mul(cs), n.saturating_mul(cs))
    }

    /// What closing fails with after a broken overlap check ([`Overlap::close_error`]).
    pub(crate) fn overlap_close_error(&self) -> Option<Error> {
        self.overlap.close_error()
    }

    /// qemu's inactive-L2 overlap check reads every snapshot's L1 table: with it on,
    /// one that cannot be used fails every later check (see [`Overlap::broken`]).
    pub(crate) fn check_inactive_l2(&mut self) {
        let cs = self.cs();
        let problem = self.snapshots.iter().find_map(|s| s.l1_problem(cs));
        if let Some(p) = problem {
            self.overlap.break_with(p.errno());
        }
    }

    /// Whether a fatal corruption event was signalled: as qemu (which detaches the
    /// driver), closing then writes nothing more to the image.
    pub(crate) fn corruption_signalled(&self) -> bool {
        self.corruption_fatal
    }

    /// Records that the image is open read-only: its corruption events are then
    /// non-fatal (reported, nothing marked), as qemu's on an image it cannot write.
    pub(crate) fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    /// qemu's `qcow2_signal_corruption` as `check` meets it (reading a refcount): the
    /// event's line is returned, for the check's findings in their order, instead of
    /// being reported; `None` once one was signalled. Fatal on a writable image (marked
    /// corrupt on disk, as [`Meta::corruption`]); on a read-only one qemu only says so.
    pub(crate) fn corruption_line(&mut self, what: &str, writable: bool) -> Option<String> {
        if self.corruption_reported {
            return None;
        }
        self.corruption_reported = true;
        self.corruption_fatal = writable;
        if !writable {
            return Some(format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will \
                 be suppressed"
            ));
        }
        if self.h.version >= 3 && self.h.incompatible & INCOMPAT_CORRUPT == 0 {
            self.h.incompatible |= INCOMPAT_CORRUPT;
            let v = self.h.incompatible;
            let _ = (self.file.write_all_at(&v.to_be_bytes(), INCOMPATIBLE_AT))
                .and_then(|()| self.file.flush());
        }
        Some(format!(
            "qcow2: Marking image as corrupt: {what}; further corruption events will be \
             suppressed"
        ))
    }

    /// qemu's `qcow2_signal_corruption` (fatal where qemu's is): on a read-write open
    /// marks a v3 image corrupt on disk; reports the event (blockio's corruption
    /// reporter: the CLI prints qemu's "Marking image as corrupt" line, or on a
    /// read-only open, where the event is not fatal, its "Image is corrupt" line) once
    /// per open image, as qemu: the first event, and a fatal one after non-fatal ones;
    /// returns the error to fail the request with.
    pub(crate) fn corruption(&mut self, what: String, offset: u64) -> Error {
        let fatal = !self.read_only;
        if (fatal && !self.corruption_fatal) || !self.corruption_reported {
            self.corruption_reported = true;
            self.corruption_fatal |= fatal;
            diskimg_blockio::report_corruption("qcow2", &what, fatal);
        }
        if fatal && self.h.version >= 3 && self.h.incompatible & INCOMPAT_CORRUPT == 0 {
            self.h.incompatible |= INCOMPAT_CORRUPT;
            let v = self.h.incompatible;
            // As qemu, a failure to mark (a read-only file) still fails the request
            // with the corruption.
            let _ = (self.file.write_all_at(&v.to_be_bytes(), INCOMPATIBLE_AT))
                .and_then(|()| self.file.flush());
        }
        Error::corrupt("qcow2", what, offset)
    }
}
