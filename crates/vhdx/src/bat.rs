//! The Block Allocation Table (MS-VHDX 2.5): entry encoding and the chunk geometry that
//! interleaves payload and sector bitmap entries.

use diskimg_blockio::{Error, Result};

use crate::format::{FMT, MAX_HOST_OFFSET, MIB};
use crate::metadata::Metadata;

/// `PAYLOAD_BLOCK_NOT_PRESENT` (MS-VHDX 2.5.1.1): no space allocated; reads zero, or the
/// parent's data in a differencing disk.
pub(crate) const PAYLOAD_NOT_PRESENT: u8 = 0;
/// `PAYLOAD_BLOCK_UNDEFINED`: content undefined (read as zeroes).
pub(crate) const PAYLOAD_UNDEFINED: u8 = 1;
/// `PAYLOAD_BLOCK_ZERO`: reads as zeroes.
pub(crate) const PAYLOAD_ZERO: u8 = 2;
/// `PAYLOAD_BLOCK_UNMAPPED`: unmapped by the guest (read as zeroes).
pub(crate) const PAYLOAD_UNMAPPED: u8 = 3;
/// `PAYLOAD_BLOCK_FULLY_PRESENT`: the whole block is stored at the entry's offset.
pub(crate) const PAYLOAD_FULLY_PRESENT: u8 = 6;
/// `PAYLOAD_BLOCK_PARTIALLY_PRESENT`: per sector, the sector bitmap says whether the block
/// or the parent holds the data (differencing disks only).
pub(crate) const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// `SB_BLOCK_NOT_PRESENT` (MS-VHDX 2.5.1.2).
pub(crate) const SB_NOT_PRESENT: u8 = 0;
/// `SB_BLOCK_PRESENT`: the 1 MiB sector bitmap block is at the entry's offset.
pub(crate) const SB_PRESENT: u8 = 6;

/// Size of one sector bitmap block (MS-VHDX 2.5.1.2).
pub(crate) const SB_BLOCK_SIZE: u64 = MIB;

/// The state field (bits 0-2) of a BAT entry.
pub(crate) fn entry_state(e: u64) -> u8 {
    u8::try_from(e & 7).unwrap_or(0)
}

/// The file offset (`FileOffsetMB`, bits 20-63, in MiB) of a BAT entry, in bytes.
/// Offsets beyond [`MAX_HOST_OFFSET`] (no real file is that large) read as 0, which
/// every user treats as invalid for a present block.
pub(crate) fn entry_offset(e: u64) -> u64 {
    let off = e & !(MIB - 1);
    if off > MAX_HOST_OFFSET { 0 } else { off }
}

/// A BAT entry with `state` at byte `offset` (a multiple of 1 MiB).
pub(crate) fn make_entry(state: u8, offset: u64) -> u64 {
    (offset & !(MIB - 1)) | u64::from(state & 7)
}

/// How payload blocks and sector bitmap blocks map onto BAT entries (MS-VHDX 2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Payload block size in bytes.
    pub(crate) block_size: u64,
    /// Logical sector size in bytes.
    pub(crate) logical_sector: u64,
    /// Payload blocks per sector bitmap block: 2^23 * logical sector / block size.
    pub(crate) chunk_ratio: u64,
    /// Payload blocks covering the virtual disk.
    pub(crate) data_blocks: u64,
    /// BAT entries in use.
    pub(crate) entries: u64,
}

impl Geometry {
    /// The geometry of an image with metadata `m`.
    pub(crate) fn new(m: &Metadata) -> Result<Self> {
        let block_size = u64::from(m.block_size);
        let logical_sector = u64::from(m.logical_sector);
        let chunk_ratio = ((1u64 << 23) * logical_sector) / block_size;
        if chunk_ratio == 0 {
            return Err(Error::corrupt_unplaced(FMT, "invalid block size"));
        }
        let g = Self {
            block_size,
            logical_sector,
            chunk_ratio,
            data_blocks: 0,
            entries: 0,
        };
        Ok(g.for_size(m.virtual_size, m.has_parent))
    }

    /// The same geometry for a virtual disk of `size` bytes.
    pub(crate) fn for_size(&self, size: u64, has_parent: bool) -> Self {
        let data_blocks = size.div_ceil(self.block_size);
        let entries = if has_parent {
            data_blocks
                .div_ceil(self.chunk_ratio)
                .saturating_mul(self.chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / self.chunk_ratio
        };
        Self {
            data_blocks,
            entries,
            ..*self
        }
    }

    /// BAT index of payload block `block`.
    pub(crate) fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap entry for payload block `block`.
    pub(crate) fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// True when BAT index `i` is a sector bitmap entry.
    pub(crate) fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// First sector (within its chunk's bitmap) of payload block `block`.
    pub(crate) fn bitmap_first_sector(&self, block: u64) -> u64 {
        (block % self.chunk_ratio) * (self.block_size / self.logical_sector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Guid;

    fn meta(size: u64, bs: u32, parent: bool) -> Metadata {
        Metadata {
            block_size: bs,
            leave_blocks_allocated: false,
            has_parent: parent,
            virtual_size: size,
            virtual_size_at: 0,
            logical_sector: 512,
            physical_sector: 512,
            disk_id: Guid::ZERO,
            parent: None,
        }
    }

    #[test]
    fn entry_counts() {
        // 1 GiB with 32 MiB blocks: 32 payload entries, chunk ratio 128.
        let g = Geometry::new(&meta(1 << 30, 32 << 20, false)).unwrap_or_else(|_| panic!());
        assert_eq!((g.chunk_ratio, g.data_blocks, g.entries), (128, 32, 32));
        let g = Geometry::new(&meta(1 << 40, 1 << 20, false)).unwrap_or_else(|_| panic!());
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.payload_index(4096), 4097);
        assert_eq!(g.bitmap_index(4095), 4096);
        let g = Geometry::new(&meta(1 << 30, 32 << 20, true)).unwrap_or_else(|_| panic!());
        assert_eq!(g.entries, 129);
        assert_eq!(make_entry(6, 5 << 20), 0x50_0006);
        assert_eq!(entry_offset(0x50_0006), 5 << 20);
        assert_eq!(entry_state(0x50_0006), 6);
    }
}
