//! Creating images, as `qemu-img create -f vdi [-o static=on]` does.
//!
//! Layout: the 512-byte header sector (version 1.1, header size `0x180`, qemu's text),
//! the block map at `0x200` (rounded up to a sector), then the data area. Dynamic images
//! start with every entry `0xffffffff`; static ones map block *i* to data index *i* and
//! size the file to hold every block (sparse unless `preallocation=falloc|full`).

use std::sync::Arc;

use diskimg_blockio::{CreateOptionSpec, Error, Preallocation, Result, Storage};

use crate::VdiCreateOptions;
use crate::bmap::{UNALLOCATED, sector_align};
use crate::header::{
    BLOCK_SIZE, DISK_SIZE_MAX, FORMAT, HEADER_SECTOR, SECTOR, TYPE_DYNAMIC, TYPE_STATIC,
    new_header_sector,
};

/// The create options, with qemu's names: the vdi ones and the file layer's.
pub(crate) static CREATE_OPTIONS: &[CreateOptionSpec] = &[
    CreateOptionSpec {
        name: "size",
        kind: "<size>",
        help: "Virtual disk size",
    },
    CreateOptionSpec {
        name: "static",
        kind: "<bool (on/off)>",
        help: "VDI static (pre-allocated) image",
    },
];

/// Bytes of block map written per storage write.
const CHUNK: u64 = 1 << 20;

/// Writes a new image of `size` bytes (rounded up to whole sectors) to `storage`.
pub(crate) fn create(storage: Arc<dyn Storage>, size: u64, opts: &VdiCreateOptions) -> Result<()> {
    let is_static = opts.static_image;
    let prealloc = opts.preallocation;
    let size = size
        .checked_next_multiple_of(SECTOR)
        .ok_or_else(|| Error::invalid("size overflow"))?;
    if size > DISK_SIZE_MAX {
        return Err(Error::unsupported(
            FORMAT,
            format!(
                "Unsupported VDI image size (size is {size:#x}, max supported is {DISK_SIZE_MAX:#x})"
            ),
        ));
    }
    let blocks = size.div_ceil(BLOCK_SIZE);
    let bmap_size = sector_align(blocks * 4).ok_or_else(|| Error::invalid("size overflow"))?;
    let offset_data = HEADER_SECTOR as u64 + bmap_size;
    let image_type = if is_static { TYPE_STATIC } else { TYPE_DYNAMIC };
    let header = new_header_sector(image_type, size, blocks, offset_data)?;

    storage.set_len(0)?;
    storage.write_all_at(&header, 0)?;
    let mut g = 0u64;
    let mut pos = HEADER_SECTOR as u64;
    let end = offset_data;
    while pos < end {
        let n = (end - pos).min(CHUNK);
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| Error::invalid("size overflow"))?];
        for slot in buf.chunks_exact_mut(4) {
            if g >= blocks {
                break;
            }
            let v = if is_static {
                u32::try_from(g).map_err(|_| Error::invalid("size overflow"))?
            } else {
                UNALLOCATED
            };
            slot.copy_from_slice(&v.to_le_bytes());
            g += 1;
        }
        storage.write_all_at(&buf, pos)?;
        pos += n;
    }
    if is_static {
        let data_len = blocks * BLOCK_SIZE;
        match prealloc {
            Preallocation::Falloc | Preallocation::Full => {
                storage.preallocate(offset_data, data_len, prealloc)?;
            }
            _ => {}
        }
        let file_end = offset_data + data_len;
        if storage.len()? < file_end {
            storage.set_len(file_end)?;
        }
    }
    storage.flush()
}
