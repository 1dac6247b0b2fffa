//! Units: sectors, cluster sizes, and guest vs host offsets.
//!
//! Public APIs take plain `u64` byte offsets; format code wraps them in [`GuestOffset`]
//! and [`HostOffset`] so the two can never be mixed up.

use crate::error::{Error, Result};

/// Bytes per sector, the unit of most on-disk size fields.
pub const SECTOR_SIZE: u64 = 512;

/// A byte offset in the guest's view of the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in a host file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

impl HostOffset {
    /// `self + n`, refusing overflow.
    pub fn checked_add(self, n: u64) -> Option<HostOffset> {
        self.0.checked_add(n).map(HostOffset)
    }
}

impl GuestOffset {
    /// `self + n`, refusing overflow.
    pub fn checked_add(self, n: u64) -> Option<GuestOffset> {
        self.0.checked_add(n).map(GuestOffset)
    }
}

/// A power-of-two allocation unit (cluster, grain, block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterSize {
    bits: u32,
}

impl ClusterSize {
    /// A cluster size of `1 << bits` bytes (`bits` up to 40).
    pub fn from_bits(bits: u32) -> Result<Self> {
        if bits > 40 {
            return Err(Error::invalid("cluster size too large"));
        }
        Ok(Self { bits })
    }

    /// A cluster size of `bytes`, which must be a power of two.
    pub fn from_bytes(bytes: u64) -> Result<Self> {
        if !bytes.is_power_of_two() {
            return Err(Error::invalid("cluster size must be a power of two"));
        }
        Self::from_bits(bytes.trailing_zeros())
    }

    /// log2 of the size.
    pub fn bits(self) -> u32 {
        self.bits
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        1u64 << self.bits
    }

    /// Which cluster `offset` falls in.
    pub fn index(self, offset: u64) -> u64 {
        offset >> self.bits
    }

    /// Offset within its cluster.
    pub fn offset_in(self, offset: u64) -> u64 {
        offset & (self.bytes() - 1)
    }

    /// Rounds down to a cluster boundary.
    pub fn align_down(self, offset: u64) -> u64 {
        offset & !(self.bytes() - 1)
    }

    /// Rounds up to a cluster boundary (`None` on overflow).
    pub fn align_up(self, offset: u64) -> Option<u64> {
        offset
            .checked_add(self.bytes() - 1)
            .map(|v| v & !(self.bytes() - 1))
    }

    /// True when `offset` is on a cluster boundary.
    pub fn is_aligned(self, offset: u64) -> bool {
        self.offset_in(offset) == 0
    }

    /// Number of clusters covering `bytes` (rounded up).
    pub fn count(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.bytes())
    }
}

/// Rounds `v` up to a multiple of `align` (`align` > 0); `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_next_multiple_of(align)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_math() {
        let c = ClusterSize::from_bytes(65536).unwrap();
        assert_eq!(c.bits(), 16);
        assert_eq!(c.index(65536 * 3 + 5), 3);
        assert_eq!(c.offset_in(65536 * 3 + 5), 5);
        assert_eq!(c.align_up(1), Some(65536));
        assert_eq!(c.align_up(u64::MAX), None);
        assert_eq!(c.count(65537), 2);
        assert!(ClusterSize::from_bytes(3000).is_err());
        assert_eq!(align_up(513, 512), Some(1024));
    }
}
