//! Clusters allocated ahead for guest writes, so that an allocating write between two
//! guest flushes needs one storage flush instead of two.
//!
//! Without a reserve, a new cluster's refcount must be durable before an L2 entry points
//! to it, so every guest flush after allocating writes costs two storage flushes (one to
//! order the refcounts and data before the L2 updates, one to make the L2 updates
//! durable). With a reserve, a guest flush that follows allocations also allocates the
//! next clusters ahead: their refcounts are written and the file is grown over them (a
//! hole, reading as zeroes) before that flush, so they are durable when the next writes
//! use them.
//!
//! A write into a reserved cluster skips the ordering flush only when losing its data in
//! a crash cannot change what the guest sees outside the write: the guest cluster read as
//! zeroes before (unallocated with nothing below, or a zero cluster) and the reserved
//! host cluster was never written (it reads as zeroes). Everything else (copy-on-write,
//! encryption, reused clusters) keeps the ordering flush.
//!
//! Several threads: a guest flush releases the metadata lock during its storage flush,
//! so other threads allocate meanwhile. The reserve then grows before it runs out (a
//! refill adds to it when the guest allocated more since its last flush than it holds),
//! and the clusters a refill added are handed out before the flush that makes their
//! refcounts durable is done: each refill has a generation, a finished flush covers
//! every generation up to the one its guest flush returned ([`Meta::reserve_flushed`]),
//! and L2 entries pointing to clusters of a generation no flush has covered yet wait for
//! one (`Meta::write_deferred` flushes first, [`Meta::reserve_owes_flush`]). Refcount
//! durability before the L2 entry, the invariant, is the same as before; only who pays
//! the flush changes.
//!
//! Layout: a reserve only takes clusters that existing refcount blocks cover, and an
//! allocation that finds no free cluster below the reserve takes its first clusters, so
//! the closed file keeps qemu's layout and length (iotests 121, 313).
//! A file that cannot grow (a `raw` node with a `size`) gets no reserve: writes then
//! allocate as usual and fail only where qemu's would (iotest qemu-img-close-errors).
//!
//! Crash consistency: reserved clusters are referenced by nothing, so a crash leaks them
//! (as `qemu-img check` reports, and `check -r leaks` repairs) and corrupts nothing.
//! Every metadata operation other than the guest's writes and flushes starts with
//! [`Meta::commit_deferred`], which gives the reserve back first; so does closing.

use diskimg_blockio::Result;

use crate::engine::meta::Meta;

/// Most clusters one reserve holds (a crash leaks at most this many).
const MAX_RESERVE: u64 = 4096;

/// Fewest clusters the guest must have allocated since its last flush for a reserve.
/// A guest that flushes after every single allocation (a writethrough cache, qemu-io's
/// default) gets none: qemu leaves such an image clean after a crash (iotest 039), and
/// a reserve would leak.
const MIN_USED: u64 = 2;

/// Most refills a reserve remembers as not yet flushed (older ones count as the next).
const MAX_UNFLUSHED: usize = 16;

/// The clusters allocated ahead (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Reserve {
    /// Cluster indices `start..end` (refcount 1, referenced by nothing, never written).
    start: u64,
    end: u64,
    /// Where the reserve began, and the file's length before it was grown over it.
    first: u64,
    prior_len: u64,
    /// Clusters of the reserve below this index have durable refcounts: a storage
    /// flush followed the refill that reserved them.
    durable_to: u64,
    /// Refills no storage flush has covered yet: (generation, end of the reserve then).
    unflushed: Vec<(u64, u64)>,
    /// Changes whenever the range changes (see [`Meta::reserve_flushed`]).
    generation: u64,
    /// The newest generation a storage flush covered.
    flushed: u64,
    /// The newest generation whose clusters were handed out before a flush covered
    /// them: L2 entries pointing to them wait for that flush ([`Meta::reserve_owes_flush`]).
    owed: u64,
    /// Clusters allocated by guest writes since the last guest flush (sizes the next
    /// reserve).
    used: u64,
}

impl Meta {
    /// `n` contiguous clusters from the reserve: their host offset, or `None` (the
    /// caller allocates as usual). Counts the allocation either way. Clusters whose
    /// refcounts no flush has covered yet are handed out all the same (they are never
    /// written, so they read as zeroes); the L2 entries pointing to them then wait for
    /// that flush ([`Meta::reserve_owes_flush`]).
    pub(crate) fn take_reserved(&mut self, n: u64) -> Option<u64> {
        let r = &mut self.reserve;
        r.used = r.used.saturating_add(n);
        if r.end - r.start < n {
            return None;
        }
        // As qemu's first-fit allocator: a free run below the reserve (clusters a
        // discard freed) is used first, so the file keeps qemu's layout (iotest 250).
        if self.free_run_below(self.reserve.start, n) {
            return None;
        }
        let r = &mut self.reserve;
        let c = r.start;
        r.start += n;
        if c + n > r.durable_to {
            // The refill that reserved the last of them (an older one forgotten: the next).
            let g = r
                .unflushed
                .iter()
                .find(|&&(_, end)| end >= c + n)
                .map_or(r.generation, |&(g, _)| g);
            r.owed = r.owed.max(g);
        }
        Some(c * self.cs())
    }

    /// Whether L2 entries must wait for a storage flush: they may point to reserved
    /// clusters whose refcounts are not yet durable.
    pub(crate) fn reserve_owes_flush(&self) -> bool {
        self.reserve.owed > self.reserve.flushed
    }

    /// Whether `n` contiguous free clusters lie between the free-cluster hint and
    /// `limit`. Moves the hint up past the clusters it finds in use, so that repeated
    /// calls scan each cluster once. A refcount that cannot be read counts as a free
    /// run (the caller's usual allocation reports the error).
    fn free_run_below(&mut self, limit: u64, n: u64) -> bool {
        let mut c = self.free_hint.max(1);
        let mut first_free = None;
        let mut run = 0;
        while c < limit {
            match self.refcount(c) {
                Ok(0) => {
                    first_free.get_or_insert(c);
                    run += 1;
                    if run >= n {
                        return true;
                    }
                }
                Ok(_) => run = 0,
                Err(_) => return true,
            }
            c += 1;
        }
        self.free_hint = first_free.unwrap_or(limit).max(self.free_hint);
        false
    }

    /// Before a guest flush: when the guest allocated more clusters since the last one
    /// than the reserve holds, grows the reserve past the end of the file (to as many
    /// clusters as were allocated, within bounds) and the file over it. Returns the
    /// generation to pass to [`Meta::reserve_flushed`] after the flush.
    pub(crate) fn refill_reserve(&mut self) -> Result<u64> {
        let used = std::mem::take(&mut self.reserve.used);
        let left = self.reserve.end - self.reserve.start;
        if left >= used || used < MIN_USED || self.data.is_some() || self.lazy_refcounts() {
            return Ok(self.reserve.generation);
        }
        let cs = self.cs();
        let file_len = self.file.len()?;
        let eof = file_len.div_ceil(cs);
        if left > 0 && self.reserve.end != eof {
            // Something was allocated past the reserve: it cannot grow in one piece.
            return Ok(self.reserve.generation);
        }
        // Only clusters an existing refcount block already covers: a reserve that needed
        // a new refcount block (or a bigger refcount table) would leave that metadata
        // past the reserve when it is given back, and the file twice qemu's size.
        let want = used.next_power_of_two().clamp(16, MAX_RESERVE);
        let n = self.reservable(eof, want.saturating_sub(left).max(1))?;
        if n == 0 {
            return Ok(self.reserve.generation);
        }
        let c = self.alloc_past_end(eof, n)?;
        self.reserve.generation += 1;
        if c != eof {
            // Not right at the end (cannot happen with the hint): not usable.
            self.free_reserved(c, c + n)?;
            return Ok(self.reserve.generation);
        }
        if self.file.set_len((c + n) * cs).is_err() {
            // A file that cannot grow (a size-limited raw node): no reserve; the writes
            // allocate as usual and fail only where qemu's would.
            self.free_reserved(c, c + n)?;
            return Ok(self.reserve.generation);
        }
        let r = &mut self.reserve;
        if left == 0 {
            r.start = c;
            r.first = c;
            r.prior_len = file_len;
            r.durable_to = c;
        }
        r.end = c + n;
        if r.unflushed.len() >= MAX_UNFLUSHED {
            r.unflushed.remove(0);
        }
        r.unflushed.push((r.generation, r.end));
        Ok(r.generation)
    }

    /// `n` clusters allocated from `eof` on (never written), as a usual allocation
    /// (refcounts, overlap checks) but past any free gaps below and not from the reserve.
    fn alloc_past_end(&mut self, eof: u64, n: u64) -> Result<u64> {
        let hint = self.free_hint;
        let kept = (self.reserve.start, self.reserve.end);
        self.free_hint = hint.max(eof);
        (self.reserve.start, self.reserve.end) = (0, 0);
        let got = self.alloc_run(n);
        self.free_hint = hint;
        (self.reserve.start, self.reserve.end) = kept;
        Ok(got? / self.cs())
    }

    /// How many of the clusters `eof..eof+want` are free and covered by an existing
    /// refcount block (counting from `eof`, stopping at the first that is not).
    fn reservable(&mut self, eof: u64, want: u64) -> Result<u64> {
        let rbe = self.rb_entries();
        let mut n = 0;
        while n < want {
            let c = eof + n;
            if n == 0 || c.is_multiple_of(rbe) {
                let ti = c / rbe;
                let covered = usize::try_from(ti)
                    .ok()
                    .and_then(|i| self.reftable.get(i))
                    .is_some_and(|e| e & crate::disk::table::REFT_OFFSET_MASK != 0);
                if !covered {
                    break;
                }
            }
            if self.refcount(c)? != 0 {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// A metadata or data allocation that found no free run below the reserve: the
    /// first `n` clusters of the reserve instead (their refcounts are already 1), so
    /// that the file keeps qemu's layout (no reserve left between the old end and a
    /// new cluster). `None` when there is no reserve of that size.
    pub(in crate::engine) fn take_reserve_front(&mut self, found: u64, n: u64) -> Option<u64> {
        let r = &mut self.reserve;
        if r.start >= r.end || r.end - r.start < n || found < r.end {
            return None;
        }
        let c = r.start;
        r.start += n;
        Some(c)
    }

    /// After the storage flush that followed [`Meta::refill_reserve`] (or
    /// [`Meta::guest_flush`]) returned `generation`: the refcounts of every refill up to
    /// it are durable.
    pub(crate) fn reserve_flushed(&mut self, generation: u64) {
        let r = &mut self.reserve;
        r.flushed = r.flushed.max(generation);
        let mut to = r.durable_to;
        r.unflushed.retain(|&(g, end)| {
            if g <= generation {
                to = to.max(end);
            }
            g > generation
        });
        r.durable_to = to;
    }

    /// A storage flush under the lock just covered every refcount written so far.
    pub(crate) fn reserve_flushed_now(&mut self) {
        self.reserve_flushed(self.reserve.generation);
    }

    /// Gives the unused reserve back (refcounts to 0; the file shrinks back when the
    /// reserve is its tail). Returns whether there was one (the caller flushes if it cares).
    ///
    /// Callers hold the metadata lock exclusively (`&mut self`), so no guest write is in
    /// flight: allocating writes take the same lock and in-place overwrites hold it
    /// shared until their data is written (`overwrite.rs`). Guest reads read data
    /// outside the lock, but only from clusters an L2 entry points to, which the reserve
    /// never holds; and the file is never cut below a byte that is not zero (see
    /// [`Meta::unreserved_len`]), so a read racing the truncation sees what it would
    /// have seen anyway.
    pub(crate) fn release_reserve(&mut self) -> Result<bool> {
        let (start, end) = (self.reserve.start, self.reserve.end);
        self.reserve.start = 0;
        self.reserve.end = 0;
        self.reserve.durable_to = 0;
        self.reserve.unflushed.clear();
        self.reserve.generation += 1;
        if start >= end {
            return Ok(false);
        }
        self.free_reserved(start, end)?;
        let cs = self.cs();
        if self.file.len()? == end * cs {
            let unused = self.unreserved_len(start)?;
            self.file.set_len(unused)?;
        }
        Ok(true)
    }

    /// The file length to go back to when the reserve (unused from cluster `start` on)
    /// is the file's tail: the length before it was grown over the reserve when nothing
    /// of it was used, else the end of the clusters used (of the compressed bytes in
    /// the last one, when compressed clusters are still being packed into it). A small write into a fresh
    /// cluster at the end of the file writes only its own bytes, so the old length may
    /// lie inside the cluster before the reserve; an in-place write further into that
    /// cluster since then must not be cut off, so that cluster is kept whole unless it
    /// reads as zeroes past the old length.
    fn unreserved_len(&self, start: u64) -> Result<u64> {
        let cs = self.cs();
        let (first, prior) = (self.reserve.first, self.reserve.prior_len);
        if start != first || prior >= first * cs {
            // A cluster still being packed with compressed data ends the used part: the
            // file ends where its bytes end, as qemu's (which writes no more of it).
            let fb = self.free_byte;
            if fb != 0 && fb / cs + 1 == start && fb > prior {
                return Ok(fb);
            }
            return Ok(start * cs);
        }
        let mut tail = vec![0u8; usize::try_from(first * cs - prior).unwrap_or(0)];
        self.file.read_exact_at(&mut tail, prior)?;
        Ok(if tail.iter().all(|&b| b == 0) {
            prior
        } else {
            first * cs
        })
    }

    /// Refcounts of reserved clusters back to 0. The host epoch does not move: no L2
    /// entry ever pointed to them, so no walk reported them (a reserve given back at
    /// every metadata operation would otherwise make detached reads retry).
    fn free_reserved(&mut self, start: u64, end: u64) -> Result<()> {
        self.refcount_run(start, end - start, 0)?;
        self.free_hint = self.free_hint.min(start);
        Ok(())
    }
}
