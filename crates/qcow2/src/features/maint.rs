//! Header rewrites and whole-image operations behind `qemu-img rebase` and `commit`:
//! [`Qcow2Device::set_backing_file`] rewrites the header cluster (spec "Header", "Header
//! extensions": backing file name and backing format extension) as qemu's
//! `qcow2_update_header` does; [`Qcow2Device::make_empty`] empties the image as qemu's
//! `bdrv_make_empty` after a commit: from scratch where qemu does so
//! (`engine::empty`), otherwise by dropping every cluster of the active L1 table.

use diskimg_blockio::{Error, Result};

use crate::device::Qcow2Device;
use crate::disk::idx;
use crate::disk::table::L1E_OFFSET_MASK;
use crate::engine::deferred::L2Update;
use crate::engine::meta::write_header;
use crate::write::{ensure_l2, old_ref};

impl Qcow2Device {
    /// Points the image at another backing file (`None`: no backing file), with the
    /// backing format extension set to `format` (`qemu-img rebase -u`). Only the header
    /// changes; the open device keeps reading through the backing device it was given.
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.writable()?;
        let mut m = self.lock();
        m.commit_deferred()?;
        let mut h = m.h().clone();
        let name = name.filter(|n| !n.is_empty());
        if name.is_some() && h.has_data_file() && h.ext.data_file.is_none() {
            return Err(Error::invalid("qcow2: data file name missing"));
        }
        h.backing_file = name.map(str::to_string);
        h.ext.backing_format = name.and(format).map(str::to_string);
        write_header(&mut m, &mut h)
    }

    /// Drops every cluster of the active image so that all of it reads from the backing
    /// file again (or as zeroes), as qemu empties the top image after `commit`. Internal
    /// snapshots keep their clusters.
    pub fn make_empty(&self) -> Result<()> {
        self.writable()?;
        let mut m = self.lock();
        if m.data().is_some() {
            return Err(Error::unsupported(
                "qcow2",
                "emptying an image with an external data file",
            ));
        }
        let bitmaps = !self.bitmaps.is_empty() || m.h().ext.bitmaps.is_some();
        if m.can_empty_completely(bitmaps, m.h().crypt_method == 2) {
            // As qemu: the image is rebuilt from scratch; after a failure part way its
            // metadata is broken until the next open repairs it (it is marked dirty), so
            // this device takes no more requests.
            return m.empty_completely().inspect_err(|_| {
                self.closed.close();
            });
        }
        let cs = m.cs();
        let per_l2 = m.h().l2_entries();
        let size = m.size();
        for l1i in 0..m.l1().len() as u64 {
            let l1e = m.l1().get(idx(l1i)).copied().unwrap_or(0);
            if l1e & L1E_OFFSET_MASK == 0 {
                continue;
            }
            let mut l2 = 0u64;
            let mut upd = Vec::new();
            let mut unref = Vec::new();
            for i in 0..per_l2 {
                let guest = (l1i * per_l2 + i) * cs;
                if guest >= size {
                    break;
                }
                let (e, bm, _) = m.l2_entry(guest)?;
                if (e, bm) == (0, 0) {
                    continue;
                }
                if l2 == 0 {
                    l2 = ensure_l2(&mut m, l1i)?;
                }
                let (e2, _, _) = m.l2_entry(guest)?;
                if let Some(r) = old_ref(&m, e2) {
                    unref.push(r);
                }
                upd.push(L2Update::new(l2, i, 0, 0));
            }
            if !upd.is_empty() {
                m.defer(upd, unref, false)?;
            }
        }
        m.commit_deferred()?;
        m.file().flush()?;
        // qemu rebuilds an emptied image from scratch, so its file shrinks back to a
        // few clusters; here the freed clusters at the end of the file are cut off (the
        // tables stay where they are). Only clusters whose refcount is now zero go.
        let end = m.file().len()?.div_ceil(cs);
        let mut last = end;
        while last > 0 && m.refcount(last - 1)? == 0 {
            last -= 1;
        }
        if last < end {
            m.file().set_len(last * cs)?;
            m.file().flush()?;
        }
        Ok(())
    }
}
