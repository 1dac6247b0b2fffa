//! Header rewrites and whole-image operations behind `qemu-img rebase` and `commit`:
//! [`Qcow2Device::set_backing_file`] rewrites the header cluster (spec "Header", "Header
//! extensions": backing file name and backing format extension) as qemu's
//! `qcow2_update_header` does; [`Qcow2Device::make_empty`] drops every cluster of the
//! active L1 table, as qemu's `bdrv_make_empty` after a commit.

use diskimg_blockio::{Error, Result};

use crate::device::Qcow2Device;
use crate::header::{Header, V2_HEADER_LEN};
use crate::meta::{Meta, read_host};
use crate::table::L1E_OFFSET_MASK;
use crate::write::{ensure_l2, idx, old_ref};

/// Writes `h` as the whole header cluster: fixed fields (unknown fields of a longer v3
/// header kept), the extensions, then the backing file name. Updates the backing name
/// offset and length in `h`.
pub(crate) fn write_header(m: &mut Meta, h: &mut Header) -> Result<()> {
    let cs = m.cs();
    let hlen = if h.version >= 3 {
        u64::from(h.header_length)
    } else {
        u64::from(V2_HEADER_LEN)
    };
    // Unknown bytes of a longer existing header are kept (never more than the new
    // header's length: an upgrade from v2 must not copy old extension bytes).
    let old_hlen = if m.h.version >= 3 {
        u64::from(m.h.header_length)
    } else {
        u64::from(V2_HEADER_LEN)
    };
    let mut buf = m.limits.alloc("qcow2 header", cs)?;
    let keep = buf
        .get_mut(..idx(hlen.min(old_hlen).min(cs)))
        .ok_or(Error::invalid("qcow2: header too large"))?;
    read_host(m.file.as_ref(), keep, 0)?;
    let ext = h.ext.serialise(h.version);
    let name = h.backing_file.clone().unwrap_or_default();
    let ext_end = hlen + ext.len() as u64;
    let end = ext_end + name.len() as u64;
    if end > cs {
        return Err(Error::invalid(
            "Cannot update the qcow2 header: the header, its extensions and the backing file \
             name do not fit in the first cluster",
        ));
    }
    if name.is_empty() {
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
    } else {
        h.backing_file_offset = ext_end;
        h.backing_file_size =
            u32::try_from(name.len()).map_err(|_| Error::invalid("backing file name too long"))?;
    }
    // The fixed fields first: with a 104-byte v3 header the compression type byte is
    // not part of the header, the extensions overwrite it.
    if !h.write_fixed(&mut buf) {
        return Err(Error::invalid("qcow2: header does not fit"));
    }
    if hlen < 112
        && let Some(pad) = buf.get_mut(idx(hlen)..idx(112.min(cs)))
    {
        pad.fill(0);
    }
    if let Some(d) = buf.get_mut(idx(hlen)..idx(ext_end)) {
        d.copy_from_slice(&ext);
    }
    if let Some(d) = buf.get_mut(idx(ext_end)..idx(end)) {
        d.copy_from_slice(name.as_bytes());
    }
    m.file.flush()?;
    m.file.write_all_at(&buf, 0)?;
    m.file.flush()?;
    m.h = h.clone();
    Ok(())
}

impl Qcow2Device {
    /// Points the image at another backing file (`None`: no backing file), with the
    /// backing format extension set to `format` (`qemu-img rebase -u`). Only the header
    /// changes; the open device keeps reading through the backing device it was given.
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.writable()?;
        let mut m = self.lock();
        m.commit_deferred()?;
        let mut h = m.h.clone();
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
        if m.data.is_some() {
            return Err(Error::unsupported(
                "qcow2",
                "emptying an image with an external data file",
            ));
        }
        let cs = m.cs();
        let per_l2 = m.h.l2_entries();
        let size = m.size;
        for l1i in 0..m.l1.len() as u64 {
            let l1e = m.l1.get(idx(l1i)).copied().unwrap_or(0);
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
                upd.push((l2, i, 0, 0));
            }
            if !upd.is_empty() {
                m.defer(upd, unref, false)?;
            }
        }
        m.commit_deferred()?;
        m.file.flush()?;
        // qemu rebuilds an emptied image from scratch, so its file shrinks back to a
        // few clusters; here the freed clusters at the end of the file are cut off (the
        // tables stay where they are). Only clusters whose refcount is now zero go.
        let end = m.file.len()?.div_ceil(cs);
        let mut last = end;
        while last > 0 && m.refcount(last - 1)? == 0 {
            last -= 1;
        }
        if last < end {
            m.file.set_len(last * cs)?;
            m.file.flush()?;
        }
        Ok(())
    }
}
