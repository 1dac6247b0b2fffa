//! Reading what a device shows, within a budget: the fuzz targets that open an image
//! (`qcow2_rw`, `json_backing`) walk its map and read each extent's start.

use diskimg_blockio::BlockDevice;

/// Maps and reads up to `steps` extents of `dev` from offset 0 (16 KiB of each at most);
/// errors end the walk, they are what the target probes for.
pub fn touch(dev: &dyn BlockDevice, steps: usize) {
    let size = dev.virtual_size();
    let mut buf = vec![0u8; 16 << 10];
    let mut pos = 0u64;
    for _ in 0..steps {
        let Some(left) = size.checked_sub(pos).filter(|l| *l > 0) else {
            break;
        };
        let Ok(e) = dev.map(pos, left) else {
            break;
        };
        let n = e.len.min(buf.len() as u64) as usize;
        let _ = dev.read_at(&mut buf[..n], pos);
        pos = pos.saturating_add(e.len.max(1));
    }
}
