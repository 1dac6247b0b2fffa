//! qemu's corruption events for invalid L1 and L2 entries met by guest reads and writes
//! (`qcow2_signal_corruption` in `qcow2_get_host_offset` and `calculate_l2_meta`): the
//! request fails with EIO as before, and the event is signalled with qemu's words: a
//! writable image is marked corrupt (the CLI prints qemu's "Marking image as corrupt"
//! line, iotest 271), a read-only one is only reported ("Image is corrupt", iotest 060).

use diskimg_blockio::{Error, Result};

use crate::device::Qcow2Device;
use crate::disk::table::classify;

/// Which request met the entry: qemu words the two events slightly differently (its
/// read path puts two spaces before the parenthesis).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// A read (and `map`).
    Read,
    /// A write or zero write.
    Write,
}

/// Most clusters of a failed request searched for the invalid entry.
const MAX_SCAN: u64 = 1 << 16;

/// Whether `what` is one of the entry problems `classify` reports.
fn entry_problem(what: &str) -> bool {
    what.starts_with("subcluster both allocated and zero")
        || what.starts_with("L2 table offset not cluster-aligned")
        || what.starts_with("allocated subclusters in an unallocated cluster")
        || what.starts_with("Cluster allocation offset unaligned")
}

/// qemu's `%#x`: `0` for zero, `0x…` otherwise.
pub(crate) fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

impl Qcow2Device {
    /// `r`, the result of guest request `req` over `off..off+len`; an invalid-entry
    /// error is signalled as qemu's corruption event first (fatal on a writable image).
    pub(crate) fn signal_invalid<T>(
        &self,
        r: Result<T>,
        off: u64,
        len: u64,
        req: Request,
    ) -> Result<T> {
        let e = match r {
            Err(e @ Error::Corrupt { .. }) => e,
            other => return other,
        };
        let Error::Corrupt { what, .. } = &e else {
            return Err(e);
        };
        if !entry_problem(what) {
            return Err(e);
        }
        Err(self.signal_entry(off, len, req).unwrap_or(e))
    }

    /// Finds the first invalid entry of `off..off+len` and signals it.
    fn signal_entry(&self, off: u64, len: u64, req: Request) -> Option<Error> {
        let mut m = self.lock();
        let cs = m.cs();
        let first = off / cs;
        let last = (off + len.max(1) - 1) / cs;
        for c in first..=last.min(first + MAX_SCAN) {
            let l1_index = c * cs / m.h().l1_coverage();
            if let Some((l2, at)) = m.l1_misaligned(l1_index) {
                let what = format!(
                    "L2 table offset {} unaligned (L1 index: {})",
                    hex(l2),
                    hex(l1_index)
                );
                return Some(m.corruption(what, at));
            }
            let (e, bm, l2) = m.l2_entry(c * cs).ok()?;
            if classify(m.h(), e, bm, 0, l2).is_ok() {
                continue;
            }
            let index = c % m.h().l2_entries();
            let host = e & crate::disk::table::L2E_OFFSET_MASK;
            let gap = if req == Request::Read { "  " } else { " " };
            let what = if host & (cs - 1) != 0 && req == Request::Write {
                // qemu's write path (`handle_copied`) names the guest offset.
                format!(
                    "Data cluster offset {} unaligned (guest offset: {})",
                    hex(host),
                    hex(off.max(c * cs))
                )
            } else if host & (cs - 1) != 0 {
                format!(
                    "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
                    hex(host),
                    hex(l2),
                    hex(index)
                )
            } else {
                format!(
                    "Invalid cluster entry found{gap}(L2 offset: {}, L2 index: {})",
                    hex(l2),
                    hex(index)
                )
            };
            return Some(m.corruption(what, l2));
        }
        None
    }
}
