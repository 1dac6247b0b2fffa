//! [`BlkdebugStorage`]: a blkdebug node below a format (qemu's `file.driver=blkdebug`,
//! `blkdebug:CONFIG:FILE`): the storage the format driver reads and writes, failing
//! requests as its [`Engine`]'s rules say once the format raised their event
//! ([`Storage::debug_event`]).
//!
//! Writes raise the block layer's `pwritev`/`pwritev_done` events (`pwritev_zero` for
//! zero writes) on the node, as qemu's `bdrv_aligned_pwritev` does. With a request
//! alignment (`align`), a write that does not cover whole blocks is read-modify-written
//! as qemu's block layer does it (`bdrv_padding_rmw_read`: the `pwritev_rmw_head`/
//! `_tail` events and their `after_` events around the reads of the partial blocks),
//! serialised against the requests it overlaps ([`Tracker`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use diskimg::blockio::{DebugEvent, forward_storage};
use diskimg::{Result, Storage};

use super::tracked::{Tracked, Tracker};
use super::{Engine, IoType};

/// A storage failing requests as a blkdebug node's rules say (see the module docs).
#[derive(Debug)]
pub(crate) struct BlkdebugStorage {
    inner: Arc<dyn Storage>,
    engine: Arc<Engine>,
    /// Written since the last flush: qemu's block layer flushes a node (and so asks
    /// blkdebug) only then (`bdrv_co_flush`'s write generation).
    written: AtomicBool,
    /// The request alignment (qemu's `align`; 1: none).
    align: u64,
    /// The requests in flight.
    tracker: Tracker,
}

impl BlkdebugStorage {
    /// `inner` under the rules of `engine`, with request alignment `align` (0: none).
    pub(crate) fn new(inner: Arc<dyn Storage>, engine: Arc<Engine>, align: u64) -> Self {
        Self {
            inner,
            engine,
            written: AtomicBool::new(false),
            align: align.max(1),
            tracker: Tracker::default(),
        }
    }

    /// Writes `buf` at `offset` as qemu's `bdrv_co_pwritev_part` does on a blkdebug
    /// node (see the module docs).
    fn pwrite(&self, buf: &[u8], offset: u64) -> Result<()> {
        let a = self.align;
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| diskimg::Error::invalid("request past 2^64"))?;
        let (start, pend) = (offset - offset % a, end.div_ceil(a).saturating_mul(a));
        if (start, pend) == (offset, end) {
            let req = self.tracker.begin(offset, end);
            return self.aligned_write(&req, buf, offset);
        }
        let req = self.tracker.begin(start, pend);
        req.serialise(a);
        let mut full = self.rmw_read(start, pend, offset, end)?;
        let at = usize::try_from(offset - start).map_err(|_| diskimg::Error::internal("rmw"))?;
        full.get_mut(at..at + buf.len())
            .ok_or_else(|| diskimg::Error::internal("rmw"))?
            .copy_from_slice(buf);
        self.aligned_write(&req, &full, start)
    }

    /// Reads the partial blocks of a write of `offset..end` (padded to `start..pend`)
    /// into a buffer of the padded size, raising qemu's RMW events.
    fn rmw_read(&self, start: u64, pend: u64, offset: u64, end: u64) -> Result<Vec<u8>> {
        let a = self.align;
        let len = usize::try_from(pend - start).map_err(|_| diskimg::Error::internal("rmw"))?;
        let block = usize::try_from(a).map_err(|_| diskimg::Error::internal("rmw"))?;
        let mut full = vec![0u8; len];
        let (head, tail) = (offset != start, end != pend);
        // qemu reads head and tail at once when they are the whole padded request.
        let merge = pend - start
            == if head && tail && pend - start > a {
                2 * a
            } else {
                a
            };
        let ev = |on: bool, e: DebugEvent| {
            if on {
                self.engine.event(e);
            }
        };
        if head || merge {
            let n = if merge { len } else { block };
            ev(head, DebugEvent::PwritevRmwHead);
            ev(merge && tail, DebugEvent::PwritevRmwTail);
            self.read_block(full.get_mut(..n), start)?;
            ev(head, DebugEvent::PwritevRmwAfterHead);
            ev(merge && tail, DebugEvent::PwritevRmwAfterTail);
            if merge {
                return Ok(full);
            }
        }
        if tail {
            self.engine.event(DebugEvent::PwritevRmwTail);
            self.read_block(full.get_mut(len - block..), pend - a)?;
            self.engine.event(DebugEvent::PwritevRmwAfterTail);
        }
        Ok(full)
    }

    /// Reads whole blocks for a read-modify-write (what lies past the file reads as
    /// zeroes).
    fn read_block(&self, buf: Option<&mut [u8]>, offset: u64) -> Result<()> {
        let buf = buf.ok_or_else(|| diskimg::Error::internal("rmw"))?;
        self.engine.check(offset, buf.len() as u64, IoType::Read)?;
        let have = self.inner.len()?.saturating_sub(offset);
        let n = usize::try_from(have).unwrap_or(usize::MAX).min(buf.len());
        match buf.get_mut(..n) {
            Some(b) if !b.is_empty() => self.inner.read_exact_at(b, offset),
            _ => Ok(()),
        }
    }

    /// The write itself (`bdrv_aligned_pwritev`): after the serialising requests it
    /// overlaps, between the `pwritev` and `pwritev_done` events.
    fn aligned_write(&self, req: &Tracked<'_>, buf: &[u8], offset: u64) -> Result<()> {
        req.wait_serialising();
        self.engine.event(DebugEvent::Pwritev);
        self.write_check(offset, buf.len() as u64, IoType::Write)?;
        self.inner.write_all_at(buf, offset)?;
        self.engine.event(DebugEvent::PwritevDone);
        Ok(())
    }

    /// A zero write (`unmap`: the inner storage may release the space), under the
    /// rules of a `write_zeroes` request.
    fn zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let req = self.tracker.begin(offset, offset.saturating_add(len));
        req.wait_serialising();
        self.engine.event(DebugEvent::PwritevZero);
        self.write_check(offset, len, IoType::WriteZeroes)?;
        if unmap {
            self.inner.write_zeroes_unmap(offset, len)?;
        } else {
            self.inner.write_zeroes(offset, len)?;
        }
        self.engine.event(DebugEvent::PwritevDone);
        Ok(())
    }

    /// Checks a write-like request; failed or not, it counts as written (qemu bumps
    /// the write generation either way).
    fn write_check(&self, offset: u64, len: u64, ty: IoType) -> Result<()> {
        self.written.store(true, Ordering::Release);
        self.engine.check(offset, len, ty)
    }
}

impl Storage for BlkdebugStorage {
    forward_storage!(
        inner: len,
        set_len,
        is_read_only,
        discard_zeroes,
        preallocate,
        allocated_bytes,
        start_writeback,
    );
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.engine.check(offset, buf.len() as u64, IoType::Read)?;
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.pwrite(buf, offset)
    }
    fn read_vectored_exact_at(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        offset: u64,
    ) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.engine.check(offset, len, IoType::Read)?;
        self.inner.read_vectored_exact_at(bufs, offset)
    }
    fn write_vectored_all_at(&self, bufs: &[std::io::IoSlice<'_>], offset: u64) -> Result<()> {
        if self.align > 1 {
            let buf: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            return self.pwrite(&buf, offset);
        }
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        let req = self.tracker.begin(offset, offset.saturating_add(len));
        req.wait_serialising();
        self.engine.event(DebugEvent::Pwritev);
        self.write_check(offset, len, IoType::Write)?;
        self.inner.write_vectored_all_at(bufs, offset)?;
        self.engine.event(DebugEvent::PwritevDone);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        if self.written.swap(false, Ordering::AcqRel)
            && let Err(e) = self.engine.check(0, 0, IoType::Flush)
        {
            self.written.store(true, Ordering::Release);
            return Err(e);
        }
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zeroes(offset, len, false)
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.zeroes(offset, len, true)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_check(offset, len, IoType::Discard)?;
        self.inner.discard(offset, len)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.engine.check(offset, 1, IoType::BlockStatus)?;
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.engine.check(offset, 1, IoType::BlockStatus)?;
        self.inner.next_hole(offset)
    }
    fn debug_event(&self, event: DebugEvent) {
        self.engine.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg::blockio::MemStorage;

    #[test]
    fn requests_fail_after_the_event_and_flush_only_when_written() {
        let rules = super::super::parse_config("[inject-error]\nevent = \"l1_update\"\n").unwrap();
        let engine = Arc::new(Engine::new(rules));
        let s = BlkdebugStorage::new(Arc::new(MemStorage::new()), engine, 0);
        s.write_all_at(&[1; 512], 0).unwrap();
        s.flush().unwrap();
        s.debug_event(DebugEvent::L1Update);
        let mut buf = [0u8; 512];
        assert!(s.read_exact_at(&mut buf, 0).is_err());
        // Nothing written since the last flush: nothing to fail.
        s.flush().unwrap();
        assert!(s.write_all_at(&buf, 0).is_err());
        assert_eq!(s.len().unwrap(), 512);
    }
}
