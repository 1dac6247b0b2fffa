//! Bounds on what an untrusted image may make diskimg do.

use crate::error::{Error, Result};

/// Limits applied while opening and using images.
///
/// Every allocation whose size comes from an image goes through [`Limits::alloc`] or
/// [`Limits::check`], so a hostile header cannot make diskimg allocate without bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest single metadata table held in memory (L1, refcount table, BAT, block map…).
    pub max_metadata_bytes: u64,
    /// Memory for metadata caches (L2 tables, refcount blocks, grain tables) per image.
    pub max_cache_bytes: u64,
    /// Longest backing chain followed.
    pub max_chain_depth: u32,
    /// Most extent files one image may name (VMDK).
    pub max_extents: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_metadata_bytes: 256 << 20,
            max_cache_bytes: 32 << 20,
            max_chain_depth: 64,
            max_extents: 4096,
        }
    }
}

impl Limits {
    /// Fails with [`Error::LimitExceeded`] if `bytes` exceeds the metadata limit.
    pub fn check(&self, what: &'static str, bytes: u64) -> Result<()> {
        if bytes > self.max_metadata_bytes {
            Err(Error::LimitExceeded {
                what,
                requested: bytes,
                limit: self.max_metadata_bytes,
            })
        } else {
            Ok(())
        }
    }

    /// A zeroed buffer of `bytes`, refused beyond the metadata limit.
    pub fn alloc(&self, what: &'static str, bytes: u64) -> Result<Vec<u8>> {
        self.check(what, bytes)?;
        let n = usize::try_from(bytes).map_err(|_| Error::LimitExceeded {
            what,
            requested: bytes,
            limit: self.max_metadata_bytes,
        })?;
        Ok(vec![0u8; n])
    }

    /// A zeroed buffer for the `bytes` of a table at `offset` of a file `file_len` long.
    ///
    /// A table that does not lie wholly inside the file is refused as
    /// [`Error::Corrupt`] (`format`, `what`, at `offset`) **before** anything is
    /// allocated, so whatever a header claims costs memory proportional to the file;
    /// then the metadata limit applies as in [`Limits::alloc`].
    pub fn alloc_in_file(
        &self,
        format: &'static str,
        what: &'static str,
        offset: u64,
        bytes: u64,
        file_len: u64,
    ) -> Result<Vec<u8>> {
        match offset.checked_add(bytes) {
            Some(end) if end <= file_len => self.alloc(what, bytes),
            _ => Err(Error::corrupt(
                format,
                format!("{what} lies beyond the end of the file"),
                offset,
            )),
        }
    }

    /// Like [`Limits::alloc`] for `count` elements of `elem_size` bytes, returning a
    /// `Vec<T>` of defaults.
    pub fn alloc_elems<T: Default + Clone>(
        &self,
        what: &'static str,
        count: u64,
        elem_size: u64,
    ) -> Result<Vec<T>> {
        let bytes = count.checked_mul(elem_size).ok_or(Error::LimitExceeded {
            what,
            requested: u64::MAX,
            limit: self.max_metadata_bytes,
        })?;
        self.check(what, bytes)?;
        let n = usize::try_from(count).map_err(|_| Error::invalid("count too large"))?;
        Ok(vec![T::default(); n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_beyond_limit() {
        let l = Limits {
            max_metadata_bytes: 1024,
            ..Limits::default()
        };
        assert!(l.alloc("t", 1024).is_ok());
        assert!(matches!(
            l.alloc("t", 1025),
            Err(Error::LimitExceeded { .. })
        ));
        assert!(l.alloc_elems::<u64>("t", u64::MAX, 8).is_err());
        assert_eq!(l.alloc_elems::<u64>("t", 128, 8).unwrap().len(), 128);
    }

    #[test]
    fn in_file_checks_the_range_before_the_limit() {
        let l = Limits {
            max_metadata_bytes: 1024,
            ..Limits::default()
        };
        assert_eq!(
            l.alloc_in_file("f", "t", 512, 512, 1024).unwrap().len(),
            512
        );
        // Past the end: corrupt, even though it is also over the limit.
        assert!(matches!(
            l.alloc_in_file("f", "t", 0, 4096, 2048),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            l.alloc_in_file("f", "t", u64::MAX, 2, u64::MAX),
            Err(Error::Corrupt { .. })
        ));
        // Inside the file but over the limit.
        assert!(matches!(
            l.alloc_in_file("f", "t", 0, 2048, 4096),
            Err(Error::LimitExceeded { .. })
        ));
    }
}
