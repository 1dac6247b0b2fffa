//! [`ReadOnlyStorage`]: a wrapper refusing every write.

use std::fs::File;

use super::{Preallocation, Storage};
use crate::error::{Error, Result};

/// Wraps a storage and refuses every write.
#[derive(Debug)]
pub struct ReadOnlyStorage<S>(pub S);

impl<S: Storage> Storage for ReadOnlyStorage<S> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn len(&self) -> Result<u64> {
        self.0.len()
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn write_zeroes_unmap(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn preallocate(&self, _offset: u64, _len: u64, _mode: Preallocation) -> Result<()> {
        Err(Error::ReadOnly)
    }
    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        self.0.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> Result<u64> {
        self.0.next_hole(offset)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.0.allocated_bytes()
    }
    /// The wrapped storage's file, as a copy *source* only: [`Storage::is_read_only`] is
    /// true, so [`copy_range`](crate::copy_range) refuses to write to it (and a file
    /// opened read-only would refuse anyway).
    fn host_file(&self) -> Option<&File> {
        self.0.host_file()
    }
    #[cfg(target_os = "linux")]
    fn plain_read(&self, offset: u64, len: u64) -> Option<super::PlainRead<'_>> {
        self.0.plain_read(offset, len)
    }
}
