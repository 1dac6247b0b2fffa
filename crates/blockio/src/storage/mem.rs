//! [`MemStorage`]: a growable in-memory buffer.

use std::sync::RwLock;

use super::Storage;
use crate::error::{Error, Result};

/// A growable in-memory storage, for tests, examples and in-process pipelines.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    max_len: Option<u64>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(bytes),
            max_len: None,
        }
    }

    /// An empty storage that refuses to grow beyond `max_len` bytes (so hostile images
    /// cannot make tests allocate gigabytes).
    pub fn with_max_len(max_len: u64) -> Self {
        Self {
            data: RwLock::new(Vec::new()),
            max_len: Some(max_len),
        }
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn grow(&self, data: &mut Vec<u8>, end: u64) -> Result<()> {
        if let Some(max) = self.max_len.filter(|&max| end > max) {
            return Err(Error::LimitExceeded {
                what: "in-memory storage",
                requested: end,
                limit: max,
            });
        }
        let end = usize::try_from(end).map_err(|_| Error::invalid("storage too large"))?;
        if end > data.len() {
            data.resize(end, 0);
        }
        Ok(())
    }
}

fn range(offset: u64, len: usize) -> Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(|_| Error::invalid("offset too large"))?;
    let end = start
        .checked_add(len)
        .ok_or(Error::invalid("offset overflow"))?;
    Ok((start, end))
}

fn short_read(offset: u64, len: usize) -> Error {
    Error::io(
        format!("could not read {len} bytes at offset {offset}"),
        std::io::ErrorKind::UnexpectedEof.into(),
    )
}

impl Storage for MemStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        let src = data
            .get(start..end)
            .ok_or_else(|| short_read(offset, buf.len()))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        self.grow(&mut data, end as u64)?;
        if let Some(dst) = data.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        if len > data.len() as u64 {
            self.grow(&mut data, len)
        } else {
            data.truncate(usize::try_from(len).unwrap_or(usize::MAX));
            Ok(())
        }
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let len = usize::try_from(len).map_err(|_| Error::invalid("length too large"))?;
        let (start, end) = range(offset, len)?;
        self.grow(&mut data, end as u64)?;
        if let Some(dst) = data.get_mut(start..end) {
            dst.fill(0);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let dlen = data.len() as u64;
        let end = offset.saturating_add(len).min(dlen);
        let (start, end) = (usize::try_from(offset), usize::try_from(end));
        if let (Ok(start), Ok(end)) = (start, end)
            && let Some(dst) = data.get_mut(start..end.max(start))
        {
            dst.fill(0);
        }
        Ok(())
    }

    fn discard_zeroes(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_round_trip_and_short_read() {
        let s = MemStorage::new();
        s.write_all_at(b"hello", 10).unwrap();
        assert_eq!(s.len().unwrap(), 15);
        let mut buf = [0u8; 5];
        s.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(s.read_exact_at(&mut buf, 12).is_err());
        s.write_zeroes(11, 2).unwrap();
        s.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"h\0\0lo");
    }

    #[test]
    fn mem_storage_limit() {
        let s = MemStorage::with_max_len(100);
        assert!(matches!(
            s.write_all_at(&[1], 100),
            Err(Error::LimitExceeded { .. })
        ));
        s.write_all_at(&[1], 99).unwrap();
    }
}
