//! Growing an image (qemu-img cannot; VirtualBox's `VBoxManage modifymedium --resize` can).
//!
//! When the block map needs more room than lies between it and the data area, the first
//! data blocks are copied to free blocks at the end and the data area start moves up by
//! whole blocks (shifting every entry down by the same count). The copies are written and
//! flushed first, then the new header and the whole new block map are written in one
//! storage write from byte 0: a crash leaves either the old image (plus leaked copies) or
//! the new one. Static images get their new blocks allocated (sparse on the host unless
//! `falloc`/`full` preallocation is asked for). Shrinking is not supported.

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{Error, HostRun, PastEof, Preallocation, Result};

use crate::bmap::{UNALLOCATED, is_allocated, sector_align};
use crate::device::VdiDevice;
use crate::header::{BLOCK_SIZE, DISK_SIZE_MAX, FORMAT, SECTOR, VERSION_1_0};

/// A bitset over data indices.
struct Bits(Vec<u64>);

impl Bits {
    fn get(&self, i: u64) -> bool {
        usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.0.get(w))
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: u64) {
        if let Some(w) = usize::try_from(i / 64).ok().and_then(|w| self.0.get_mut(w)) {
            *w |= 1 << (i % 64);
        }
    }
}

fn fit32(v: u64) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::unsupported(FORMAT, "resulting header field exceeds 32 bits"))
}

/// Grows `dev` to `new_size` bytes (rounded up to a sector).
pub(crate) fn resize(
    dev: &VdiDevice,
    new_size: u64,
    prealloc: Preallocation,
    shrink: bool,
) -> Result<()> {
    dev.writable()?;
    let mut m = dev.write_meta();
    // Pending map entries go out first, so the resize starts from a consistent disk.
    dev.commit_pending(&mut m)?;
    let new_size = new_size
        .checked_add(SECTOR - 1)
        .map(|v| v / SECTOR * SECTOR)
        .ok_or_else(|| Error::invalid("size overflow"))?;
    let old_size = m.header.disk_size;
    if new_size < old_size {
        if shrink {
            return Err(Error::unsupported(FORMAT, "shrinking"));
        }
        return Err(Error::invalid(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    if new_size > DISK_SIZE_MAX {
        return Err(Error::unsupported(
            FORMAT,
            format!(
                "Unsupported VDI image size (size is {new_size:#x}, max supported is {DISK_SIZE_MAX:#x})"
            ),
        ));
    }
    let is_static = m.header.is_static();
    if prealloc != Preallocation::Off && !is_static {
        return Err(Error::invalid("Preallocation mode not supported for vdi"));
    }
    let blocks = m.header.blocks;
    let new_blocks = new_size.div_ceil(BLOCK_SIZE);
    if new_blocks <= blocks {
        m.header.disk_size = new_size;
        if let Err(e) = m.commit(dev.storage.as_ref(), None) {
            m.header.disk_size = old_size;
            return Err(e);
        }
        return dev.storage.flush();
    }
    if m.header.version == VERSION_1_0 {
        return Err(Error::unsupported(FORMAT, "growing VDI 1.0 images"));
    }
    let region = sector_align(new_blocks * 4).ok_or_else(|| Error::invalid("size overflow"))?;
    let need_end = m.header.offset_bmap + region;
    let old_data = m.header.offset_data;
    let shift = need_end.saturating_sub(old_data).div_ceil(BLOCK_SIZE);
    let new_data = old_data + shift * BLOCK_SIZE;
    fit32(new_data)?;
    let space = new_blocks + shift;

    // Data indices in use, in the pre-shift numbering.
    let mut used = Bits(dev.limits.alloc_elems::<u64>(
        "vdi block bitmap",
        space.div_ceil(64),
        8,
    )?);
    let mut max_used = None;
    for g in 0..blocks {
        let e = m.entry(g);
        if is_allocated(e) {
            used.set(u64::from(e));
            max_used = Some(max_used.map_or(u64::from(e), |x: u64| x.max(u64::from(e))));
        }
    }
    let mut cursor = max_used.map_or(0, |x| x + 1).max(shift);
    let mut take = |used: &mut Bits| -> Result<u64> {
        while cursor < space && used.get(cursor) {
            cursor += 1;
        }
        if cursor >= space {
            return Err(Error::corrupt(FORMAT, "no free data block", 0));
        }
        used.set(cursor);
        Ok(cursor)
    };

    // Step 1: copy the blocks in the way of the grown map; allocate new static blocks.
    let mut remap: Vec<(u64, u64)> = Vec::new();
    let mut block = vec![0u8; usize::try_from(BLOCK_SIZE).unwrap_or(0)];
    let mut file_end = dev.storage.len()?;
    let host = |idx: u64| old_data + idx * BLOCK_SIZE;
    for g in 0..blocks {
        let e = m.entry(g);
        if is_allocated(e) && u64::from(e) < shift {
            let k = take(&mut used)?;
            HostRun::new(dev.storage.as_ref(), host(u64::from(e)))
                .past_eof(PastEof::Zero)
                .read(&mut block)?;
            dev.storage.write_all_at(&block, host(k))?;
            file_end = file_end.max(host(k) + BLOCK_SIZE);
            remap.push((g, k));
        }
    }
    let mut added = 0u64;
    let mut new_static: Vec<u64> = Vec::new();
    if is_static {
        for _ in blocks..new_blocks {
            let k = take(&mut used)?;
            let h = host(k);
            if h < file_end {
                dev.storage.write_zeroes(h, BLOCK_SIZE.min(file_end - h))?;
            }
            if matches!(prealloc, Preallocation::Falloc | Preallocation::Full) {
                dev.storage.preallocate(h, BLOCK_SIZE, prealloc)?;
            }
            file_end = file_end.max(h + BLOCK_SIZE);
            new_static.push(k);
            added += 1;
        }
        if dev.storage.len()? < file_end {
            dev.storage.set_len(file_end)?;
        }
    }
    dev.storage.flush()?;

    // Step 2: the new header and block map, in one write.
    let mut bmap = dev.limits.alloc("vdi block map", region)?;
    for g in 0..new_blocks {
        let pre = if g < blocks {
            remap
                .iter()
                .find(|(x, _)| *x == g)
                .map(|&(_, k)| k)
                .or_else(|| {
                    let e = m.entry(g);
                    is_allocated(e).then_some(u64::from(e))
                })
        } else {
            usize::try_from(g - blocks)
                .ok()
                .and_then(|i| new_static.get(i))
                .copied()
        };
        let v = match pre {
            Some(k) => fit32(k - shift)?,
            None if g < blocks => m.entry(g),
            None => UNALLOCATED,
        };
        let off = usize::try_from(g * 4).map_err(|_| Error::internal("vdi block map index"))?;
        bmap.put_le_u32(off, v);
    }
    let mut header = m.header.clone();
    header.disk_size = new_size;
    header.blocks = new_blocks;
    header.offset_data = new_data;
    header.allocated = m.counted + added;
    let mut buf = m.prefix.clone();
    header.store(&mut buf)?;
    let prefix = buf.clone();
    buf.extend_from_slice(&bmap);
    dev.storage.write_all_at(&buf, 0)?;
    dev.storage.flush()?;
    m.prefix = prefix;
    m.header.disk_size = new_size;
    m.header.allocated = header.allocated;
    let limits = dev.limits;
    m.replace_map(bmap, new_blocks, new_data, &limits)?;
    Ok(())
}
