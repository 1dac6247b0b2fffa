//! The VM state area (qemu's `qcow2_save_vmstate`/`qcow2_load_vmstate`): a running VM's
//! saved RAM and device state lives in the image's own guest address space, right after
//! the disk. It starts at the first L1 entry the disk does not use (the virtual size
//! rounded up to the guest bytes of one L2 table) and is addressed like guest data, so
//! its clusters belong to the active L1 table, a snapshot taken afterwards keeps them
//! and reverting to it brings them back. Writes grow the L1 table as qemu's does (by
//! half again each time), and bypass the guest-size check but nothing else (refcounts,
//! copy-on-write of snapshot-shared clusters, encryption).

use diskimg_blockio::{Error, Result};

use crate::device::Qcow2Device;
use crate::engine::meta::Meta;

/// Guest offset of byte `pos` of the VM state area, and the end of `len` bytes there.
fn span(m: &Meta, pos: u64, len: u64) -> Result<(u64, u64)> {
    let cov = m.h().l1_coverage();
    let start = m
        .h()
        .l1_entries_for(m.size())
        .checked_mul(cov)
        .and_then(|base| base.checked_add(pos))
        .ok_or(Error::invalid("VM state offset out of range"))?;
    let end = start
        .checked_add(len)
        .ok_or(Error::invalid("VM state offset out of range"))?;
    Ok((start, end))
}

/// The L1 size qemu's `qcow2_grow_l1_table` picks for at least `min` entries when it
/// grows on demand (not to an exact size): half again, from the current size, until
/// `min` fits.
fn grown_l1_size(current: u64, min: u64) -> u64 {
    let mut n = current.max(1);
    while n < min {
        n = (n * 3).div_ceil(2);
    }
    n
}

/// Reads `buf.len()` bytes at `pos` of the VM state area.
pub(crate) fn load(dev: &Qcow2Device, buf: &mut [u8], pos: u64) -> Result<()> {
    dev.closed.check()?;
    let mut m = dev.lock();
    let (start, _) = span(&m, pos, buf.len() as u64)?;
    m.commit_deferred()?;
    dev.read_locked(&mut m, buf, start)
}

/// Writes `buf` at `pos` of the VM state area.
pub(crate) fn save(dev: &Qcow2Device, buf: &[u8], pos: u64) -> Result<()> {
    dev.writable()?;
    if buf.is_empty() {
        return Ok(());
    }
    {
        let mut m = dev.lock();
        let (_, end) = span(&m, pos, buf.len() as u64)?;
        let need = end.div_ceil(m.h().l1_coverage());
        let have = m.l1().len() as u64;
        if need > have {
            crate::features::resize::grow_l1(dev, &mut m, grown_l1_size(have, need))?;
        }
    }
    let start = span(&dev.lock(), pos, 0)?.0;
    crate::write::write(dev, buf, start)
}

#[cfg(test)]
mod tests {
    use super::grown_l1_size;

    #[test]
    fn l1_grows_by_half_again_like_qemu() {
        assert_eq!(grown_l1_size(1, 2), 2);
        assert_eq!(grown_l1_size(1, 3), 3);
        assert_eq!(grown_l1_size(8, 9), 12);
        assert_eq!(grown_l1_size(128, 2049), 2187);
        assert_eq!(grown_l1_size(0, 1), 1);
    }
}
