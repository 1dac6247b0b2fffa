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

use crate::bmap::{Meta, UNALLOCATED, is_allocated, sector_align};
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
    let new_size = check_request(&m, new_size, prealloc, shrink)?;
    let old_size = m.header.disk_size;
    let new_blocks = new_size.div_ceil(BLOCK_SIZE);
    if new_blocks <= m.header.blocks {
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
    let plan = relocate_blocks(dev, &m, new_blocks, prealloc)?;
    write_header_and_map(dev, &mut m, new_size, &plan)
}

/// The new size rounded up to a sector, once the request is one this image can take.
fn check_request(m: &Meta, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<u64> {
    let new_size = new_size
        .checked_add(SECTOR - 1)
        .map(|v| v / SECTOR * SECTOR)
        .ok_or_else(|| Error::invalid("size overflow"))?;
    if new_size < m.header.disk_size {
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
    if prealloc != Preallocation::Off && !m.header.is_static() {
        return Err(Error::invalid("Preallocation mode not supported for vdi"));
    }
    Ok(new_size)
}

/// What step 1 did, for step 2 to record: the grown map's geometry, the blocks copied
/// out of its way and the blocks allocated for a static image (data indices before the
/// shift).
struct Plan {
    new_blocks: u64,
    /// Bytes of the new block map region.
    region: u64,
    /// Whole blocks the data area moves up by.
    shift: u64,
    /// The new data area start.
    new_data: u64,
    /// `(guest block, new data index)` of each copied block.
    remap: Vec<(u64, u64)>,
    /// Data indices of the new static blocks, in guest order.
    new_static: Vec<u64>,
}

/// Step 1: copies the blocks in the way of the grown map to free blocks, allocates the
/// new blocks of a static image, and flushes.
fn relocate_blocks(
    dev: &VdiDevice,
    m: &Meta,
    new_blocks: u64,
    prealloc: Preallocation,
) -> Result<Plan> {
    let blocks = m.header.blocks;
    let region = sector_align(new_blocks * 4).ok_or_else(|| Error::invalid("size overflow"))?;
    let need_end = m.header.offset_bmap + region;
    let old_data = m.header.offset_data;
    let shift = need_end.saturating_sub(old_data).div_ceil(BLOCK_SIZE);
    let new_data = old_data + shift * BLOCK_SIZE;
    fit32(new_data)?;
    let mut free = FreeBlocks::new(dev, m, new_blocks + shift, shift)?;
    let mut remap: Vec<(u64, u64)> = Vec::new();
    let mut block = vec![0u8; usize::try_from(BLOCK_SIZE).unwrap_or(0)];
    let mut file_end = dev.storage.len()?;
    let host = |idx: u64| old_data + idx * BLOCK_SIZE;
    for g in 0..blocks {
        let e = m.entry(g);
        if is_allocated(e) && u64::from(e) < shift {
            let k = free.take()?;
            HostRun::new(dev.storage.as_ref(), host(u64::from(e)))
                .past_eof(PastEof::Zero)
                .read(&mut block)?;
            dev.storage.write_all_at(&block, host(k))?;
            file_end = file_end.max(host(k) + BLOCK_SIZE);
            remap.push((g, k));
        }
    }
    let mut new_static: Vec<u64> = Vec::new();
    if m.header.is_static() {
        for _ in blocks..new_blocks {
            let k = free.take()?;
            let h = host(k);
            if h < file_end {
                dev.storage.write_zeroes(h, BLOCK_SIZE.min(file_end - h))?;
            }
            if matches!(prealloc, Preallocation::Falloc | Preallocation::Full) {
                dev.storage.preallocate(h, BLOCK_SIZE, prealloc)?;
            }
            file_end = file_end.max(h + BLOCK_SIZE);
            new_static.push(k);
        }
        if dev.storage.len()? < file_end {
            dev.storage.set_len(file_end)?;
        }
    }
    dev.storage.flush()?;
    Ok(Plan {
        new_blocks,
        region,
        shift,
        new_data,
        remap,
        new_static,
    })
}

/// The free data indices (pre-shift numbering) above every used one and the shift.
struct FreeBlocks {
    used: Bits,
    cursor: u64,
    space: u64,
}

impl FreeBlocks {
    fn new(dev: &VdiDevice, m: &Meta, space: u64, shift: u64) -> Result<Self> {
        let mut used = Bits(dev.limits.alloc_elems::<u64>(
            "vdi block bitmap",
            space.div_ceil(64),
            8,
        )?);
        let mut max_used = None;
        for g in 0..m.header.blocks {
            let e = m.entry(g);
            if is_allocated(e) {
                used.set(u64::from(e));
                max_used = Some(max_used.map_or(u64::from(e), |x: u64| x.max(u64::from(e))));
            }
        }
        let cursor = max_used.map_or(0, |x| x + 1).max(shift);
        Ok(FreeBlocks {
            used,
            cursor,
            space,
        })
    }

    fn take(&mut self) -> Result<u64> {
        while self.cursor < self.space && self.used.get(self.cursor) {
            self.cursor += 1;
        }
        if self.cursor >= self.space {
            return Err(Error::corrupt_unplaced(FORMAT, "no free data block"));
        }
        self.used.set(self.cursor);
        Ok(self.cursor)
    }
}

/// Step 2: the new header and block map, in one write from byte 0, then flushed; the
/// in-memory metadata follows.
fn write_header_and_map(dev: &VdiDevice, m: &mut Meta, new_size: u64, plan: &Plan) -> Result<()> {
    let blocks = m.header.blocks;
    let mut bmap = dev.limits.alloc("vdi block map", plan.region)?;
    for g in 0..plan.new_blocks {
        let pre = if g < blocks {
            plan.remap
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
                .and_then(|i| plan.new_static.get(i))
                .copied()
        };
        let v = match pre {
            Some(k) => fit32(k - plan.shift)?,
            None if g < blocks => m.entry(g),
            None => UNALLOCATED,
        };
        let off = usize::try_from(g * 4).map_err(|_| Error::internal("vdi block map index"))?;
        bmap.put_le_u32(off, v);
    }
    let mut header = m.header.clone();
    header.disk_size = new_size;
    header.blocks = plan.new_blocks;
    header.offset_data = plan.new_data;
    header.allocated = m.counted + plan.new_static.len() as u64;
    let mut buf = m.prefix.clone();
    header.store(&mut buf)?;
    let prefix = buf.clone();
    buf.extend_from_slice(&bmap);
    // The grown map overwrites the blocks moved out of its way (host bytes a walk may
    // have reported): detached readers must read again. Walks wait for the lock held.
    if plan.shift > 0 || !plan.remap.is_empty() {
        dev.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    dev.storage.write_all_at(&buf, 0)?;
    dev.storage.flush()?;
    m.prefix = prefix;
    m.header.disk_size = new_size;
    m.header.allocated = header.allocated;
    let limits = dev.limits;
    m.replace_map(bmap, plan.new_blocks, plan.new_data, &limits)
}
