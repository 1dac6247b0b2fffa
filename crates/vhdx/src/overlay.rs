//! A read-only view of an image with its log replayed in memory, so a read-only open
//! of a dirty image sees the replayed metadata without the file being modified.

use std::sync::Arc;

use diskimg_blockio::{Error, Result, Storage};

use crate::log::{Change, Replay};

/// The host file as it would be after replaying the log (reads only).
#[derive(Debug)]
pub(crate) struct ReplayedStorage {
    inner: Arc<dyn Storage>,
    replay: Replay,
}

impl ReplayedStorage {
    /// Wraps `inner` with `replay` applied on every read.
    pub(crate) fn new(inner: Arc<dyn Storage>, replay: Replay) -> Self {
        Self { inner, replay }
    }
}

impl Storage for ReplayedStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = u64::try_from(buf.len()).map_err(|_| Error::invalid("read too large"))?;
        let end = offset
            .checked_add(len)
            .ok_or(Error::invalid("offset overflow"))?;
        let inner_len = self.inner.len()?;
        if end > self.len()? {
            return Err(Error::io(
                format!("could not read {len} bytes at offset {offset}"),
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        // The part inside the real file comes from it; growth to LastFileOffset is zeroes.
        let real = usize::try_from(inner_len.saturating_sub(offset).min(len)).unwrap_or(0);
        let (head, tail) = buf.split_at_mut(real);
        if !head.is_empty() {
            self.inner.read_exact_at(head, offset)?;
        }
        tail.fill(0);
        for c in &self.replay.changes {
            let (c_off, c_len) = match c {
                Change::Data { offset, data } => (*offset, data.len() as u64),
                Change::Zero { offset, length } => (*offset, *length),
            };
            let (lo, hi) = (offset.max(c_off), end.min(c_off.saturating_add(c_len)));
            if lo >= hi {
                continue;
            }
            let dst_start = usize::try_from(lo - offset).unwrap_or(0);
            let n = usize::try_from(hi - lo).unwrap_or(0);
            let Some(dst) = buf.get_mut(dst_start..dst_start + n) else {
                continue;
            };
            match c {
                Change::Data { data, .. } => {
                    let src_start = usize::try_from(lo - c_off).unwrap_or(0);
                    if let Some(src) = data.get(src_start..src_start + n) {
                        dst.copy_from_slice(src);
                    }
                }
                Change::Zero { .. } => dst.fill(0),
            }
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.inner.len()?.max(self.replay.last_file_offset))
    }

    diskimg_blockio::read_only_storage!();
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;
    use diskimg_blockio::MemStorage;

    #[test]
    fn patches_apply_in_order_and_file_grows() {
        let inner: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![1u8; 8192]));
        let replay = Replay {
            changes: vec![
                Change::Data {
                    offset: 4096,
                    data: vec![2u8; 4096],
                },
                Change::Zero {
                    offset: 6144,
                    length: 4096,
                },
            ],
            last_file_offset: 16384,
            sequence: 1,
        };
        let s = ReplayedStorage::new(inner.clone(), replay);
        assert_eq!(s.len().unwrap(), 16384);
        let mut buf = vec![9u8; 16384];
        s.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 1));
        assert!(buf[4096..6144].iter().all(|&b| b == 2));
        assert!(buf[6144..].iter().all(|&b| b == 0));
        assert!(s.write_all_at(&[0], 0).is_err());
        assert_eq!(inner.len().unwrap(), 8192);
    }
}
