//! [`BlkdebugStorage`]: a blkdebug node below a format (qemu's `file.driver=blkdebug`,
//! `blkdebug:CONFIG:FILE`): the storage the format driver reads and writes, failing
//! requests as its [`Engine`]'s rules say once the format raised their event
//! ([`Storage::debug_event`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use diskimg::blockio::{DebugEvent, Preallocation};
use diskimg::{Result, Storage};

use super::{Engine, IoType};

/// A storage failing requests as a blkdebug node's rules say (see the module docs).
#[derive(Debug)]
pub(crate) struct BlkdebugStorage {
    inner: Arc<dyn Storage>,
    engine: Arc<Engine>,
    /// Written since the last flush: qemu's block layer flushes a node (and so asks
    /// blkdebug) only then (`bdrv_co_flush`'s write generation).
    written: AtomicBool,
}

impl BlkdebugStorage {
    /// `inner` under the rules of `engine`.
    pub(crate) fn new(inner: Arc<dyn Storage>, engine: Arc<Engine>) -> Self {
        Self {
            inner,
            engine,
            written: AtomicBool::new(false),
        }
    }

    /// Checks a write-like request; failed or not, it counts as written (qemu bumps
    /// the write generation either way).
    fn write_check(&self, offset: u64, len: u64, ty: IoType) -> Result<()> {
        self.written.store(true, Ordering::Release);
        self.engine.check(offset, len, ty)
    }
}

impl Storage for BlkdebugStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.engine.check(offset, buf.len() as u64, IoType::Read)?;
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_check(offset, buf.len() as u64, IoType::Write)?;
        self.inner.write_all_at(buf, offset)
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
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.write_check(offset, len, IoType::Write)?;
        self.inner.write_vectored_all_at(bufs, offset)
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
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
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.write_check(offset, len, IoType::WriteZeroes)?;
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_check(offset, len, IoType::Discard)?;
        self.inner.discard(offset, len)
    }
    fn discard_zeroes(&self) -> bool {
        self.inner.discard_zeroes()
    }
    fn preallocate(&self, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
        self.inner.preallocate(offset, len, mode)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.engine.check(offset, 1, IoType::BlockStatus)?;
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.engine.check(offset, 1, IoType::BlockStatus)?;
        self.inner.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.inner.allocated_bytes()
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len);
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
        let s = BlkdebugStorage::new(Arc::new(MemStorage::new()), engine);
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
