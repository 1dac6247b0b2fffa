//! Write-behind of small writes into fresh clusters (issue 17).
//!
//! A small guest write into a fresh cluster writes only its own bytes (`write.rs`), so a
//! run of allocating writes leaves a few dirty pages in each of many consecutive host
//! clusters. Left alone, the page cache writes them back only inside the guest's next
//! flush (`fdatasync`), which then waits for that data before it can commit the file
//! system's journal. Handing each run of [`WRITE_BEHIND`] such writes to
//! `Storage::start_writeback` as soon as it is complete starts that write-back while
//! the guest goes on writing (the device is otherwise idle then), so the flush finds
//! most of the data on its way or done. Only runs of consecutive host clusters are
//! handed over (the range is bounded and holds nothing but the run's clusters: an L2
//! table allocated among them breaks the run, so its cached pages are never dropped).
//!
//! Durability and ordering do not change: write-back may happen at any time anyway, and
//! a flush still waits for everything. Storages without a page cache (`O_DIRECT`,
//! io_uring, memory) ignore `start_writeback`.
//!
//! Measured in `docs/benchmarks.md` ("Session 8: allocating writes against imago, where the
//! time goes, write-behind").

use std::sync::Mutex;

/// Small writes into consecutive fresh clusters handed to write-back at once.
pub(crate) const WRITE_BEHIND: u64 = 8;

/// The run of small writes into consecutive fresh host clusters not yet handed to
/// write-back: bytes `lo..hi`, the cluster the next write must land in to extend it,
/// and how many writes it holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Run {
    lo: u64,
    hi: u64,
    next: u64,
    writes: u64,
}

/// Write-behind state of one device (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Behind {
    on: bool,
    run: Mutex<Run>,
}

impl Behind {
    /// Write-behind on or off (`x-write-behind=off`, see `Qcow2OpenOptions`).
    pub(crate) fn new(on: bool) -> Self {
        Self {
            on,
            run: Mutex::default(),
        }
    }

    /// A small write into a fresh cluster went to host bytes `host..host+len` (cluster
    /// size `cs`): the runs it completes or breaks, to hand to the storage's write-back
    /// (after the metadata lock is dropped).
    pub(crate) fn wrote(&self, cs: u64, host: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let done = if self.on {
            let mut run = self.run.lock().unwrap_or_else(|e| e.into_inner());
            add(&mut run, cs, host, len)
        } else {
            [None, None]
        };
        done.into_iter().flatten()
    }
}

/// Adds a write to `run`; returns the byte ranges to hand to write-back (the run it
/// broke, the run it completed).
fn add(run: &mut Run, cs: u64, host: u64, len: u64) -> [Option<(u64, u64)>; 2] {
    let c = host / cs.max(1);
    let end = host.saturating_add(len);
    let mut out = [None, None];
    if run.writes > 0 && c != run.next && c + 1 != run.next {
        out[0] = Some((run.lo, run.hi));
        *run = Run::default();
    }
    if run.writes == 0 {
        run.lo = host;
    }
    run.lo = run.lo.min(host);
    run.hi = run.hi.max(end);
    run.next = c + 1;
    run.writes += 1;
    if run.writes >= WRITE_BEHIND {
        out[1] = Some((run.lo, run.hi));
        *run = Run::default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;

    #[test]
    fn a_run_of_consecutive_clusters_goes_out_when_complete() {
        let mut run = Run::default();
        for k in 0..WRITE_BEHIND - 1 {
            assert_eq!(add(&mut run, CS, (10 + k) * CS + 4096, 4096), [None, None]);
        }
        let last = (10 + WRITE_BEHIND - 1) * CS;
        assert_eq!(
            add(&mut run, CS, last + 8192, 4096),
            [None, Some((10 * CS + 4096, last + 12288))]
        );
        assert_eq!(run, Run::default());
    }

    #[test]
    fn a_gap_hands_over_the_run_before_it() {
        let mut run = Run::default();
        add(&mut run, CS, 10 * CS, 4096);
        add(&mut run, CS, 11 * CS + 61440, 4096);
        // A second write into the same cluster extends the run.
        add(&mut run, CS, 11 * CS, 4096);
        // Cluster 12 went to an L2 table: 13 breaks the run.
        assert_eq!(
            add(&mut run, CS, 13 * CS, 4096),
            [Some((10 * CS, 12 * CS)), None]
        );
        assert_eq!((run.lo, run.hi, run.writes), (13 * CS, 13 * CS + 4096, 1));
    }
}
