//! Compressed writes in two steps: [`BlockDevice::compress_units`] does the CPU work
//! (deflate, zstd) without touching the image, so callers can run it on many threads
//! at once, and [`BlockDevice::write_compressed_units`] stores the result, in whatever
//! order the caller wants the image laid out.
//!
//! `convert -c` compresses on its worker threads and writes in guest order on one
//! thread: the output is laid out as with one thread (and as qemu-img lays it out
//! without `-W`), at the speed of all cores.

use crate::error::{Error, Result};

/// One unit prepared by [`BlockDevice::compress_units`](crate::BlockDevice::compress_units).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackedUnit {
    /// The unit compressed, in the device's own encoding (a qcow2 compressed cluster;
    /// a VMDK grain record with its marker and padding).
    Compressed(Vec<u8>),
    /// The guest bytes of a unit stored plainly: qcow2 keeps a cluster uncompressed when
    /// compression does not make it smaller.
    Plain(Vec<u8>),
}

impl PackedUnit {
    /// Bytes held.
    pub fn len(&self) -> usize {
        match self {
            Self::Compressed(b) | Self::Plain(b) => b.len(),
        }
    }

    /// True when no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Consecutive whole units compressed ahead of their write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompressedUnits {
    /// Guest offset of the first unit (a multiple of the unit size).
    pub offset: u64,
    /// Guest bytes covered: whole units, the last one possibly the device's partial last
    /// unit.
    pub len: u64,
    /// The units in guest order.
    pub units: Vec<PackedUnit>,
}

impl CompressedUnits {
    /// Checks that `units` has one entry per `unit` bytes of `len` starting at an aligned
    /// `offset`, and returns the guest offset and length of each unit.
    pub fn unit_ranges(&self, unit: u64) -> Result<Vec<(u64, u64)>> {
        let bad = || Error::invalid("compressed units do not match their range");
        if unit == 0 || !self.offset.is_multiple_of(unit) || self.len == 0 {
            return Err(bad());
        }
        let n = self.len.div_ceil(unit);
        if u64::try_from(self.units.len()).ok() != Some(n) {
            return Err(bad());
        }
        let end = self.offset.checked_add(self.len).ok_or_else(bad)?;
        Ok((0..n)
            .map(|i| {
                let off = self.offset + i * unit;
                (off, unit.min(end - off))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_ranges_checks_the_shape() {
        let mut c = CompressedUnits {
            offset: 128,
            len: 64 * 2 + 10,
            units: vec![PackedUnit::Plain(vec![1]); 3],
        };
        assert_eq!(
            c.unit_ranges(64).unwrap(),
            vec![(128, 64), (192, 64), (256, 10)]
        );
        assert!(c.unit_ranges(0).is_err());
        assert!(c.unit_ranges(100).is_err());
        c.units.pop();
        assert!(c.unit_ranges(64).is_err());
        c.offset = u64::MAX - 63;
        assert!(c.unit_ranges(64).is_err());
        assert_eq!(PackedUnit::Compressed(vec![]).len(), 0);
        assert!(PackedUnit::Compressed(vec![]).is_empty());
    }
}
