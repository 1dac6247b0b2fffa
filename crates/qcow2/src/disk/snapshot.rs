//! Internal snapshots (spec "Snapshots"): the snapshot table, read-only.

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{Error, Result, SnapshotInfo, Storage};

use crate::disk::header::{Header, MAX_L1_BYTES};

/// qemu's limit on the snapshot table (64 MiB).
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// qemu's limit on unknown extra data per entry.
const MAX_EXTRA: u32 = 1024;

/// One snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Bytes 0–7: offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Bytes 8–11: entries in that L1 table.
    pub l1_size: u32,
    /// Extra data bytes 8–15: guest size at the snapshot (None when absent).
    pub disk_size: Option<u64>,
    /// What `info` shows.
    pub info: SnapshotInfo,
    /// The entry as stored (unpadded), kept verbatim when the table is rewritten.
    pub raw: Vec<u8>,
}

fn bad(what: &'static str, off: u64) -> Error {
    Error::corrupt("qcow2", what, off)
}

/// Reads and validates the snapshot table.
pub(crate) fn read_snapshots(
    file: &dyn Storage,
    h: &Header,
    limits: &diskimg_blockio::Limits,
) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::new();
    if h.nb_snapshots == 0 {
        return Ok((out, 0));
    }
    let base = h.snapshots_offset;
    let file_len = file.len()?;
    let avail = file_len.saturating_sub(base).min(MAX_SNAPSHOT_TABLE);
    let mut buf = limits.alloc("snapshot table", avail)?;
    file.read_exact_at(&mut buf, base)?;
    let mut off = 0usize;
    let cs = h.cluster_size();
    for _ in 0..h.nb_snapshots {
        let at = base + off as u64;
        let e = |what| bad(what, at);
        let l1_offset = buf.be_u64(off).ok_or(e("Invalid snapshot table offset"))?;
        let l1_size = buf
            .be_u32(off + 8)
            .ok_or(e("Invalid snapshot table offset"))?;
        let id_len = usize::from(buf.be_u16(off + 12).ok_or(e("snapshot table truncated"))?);
        let name_len = usize::from(buf.be_u16(off + 14).ok_or(e("snapshot table truncated"))?);
        let date_sec = buf.be_u32(off + 16).ok_or(e("snapshot table truncated"))?;
        let date_nsec = buf.be_u32(off + 20).ok_or(e("snapshot table truncated"))?;
        let vm_clock = buf.be_u64(off + 24).ok_or(e("snapshot table truncated"))?;
        let vm_state32 = buf.be_u32(off + 32).ok_or(e("snapshot table truncated"))?;
        let extra = buf.be_u32(off + 36).ok_or(e("snapshot table truncated"))?;
        if extra > MAX_EXTRA + 24 {
            return Err(e("Too much extra metadata in snapshot table entry"));
        }
        let x = off + 40;
        let extra_len = usize::try_from(extra).map_err(|_| e("snapshot table truncated"))?;
        let vm_state = if extra >= 8 {
            buf.be_u64(x).ok_or(e("snapshot table truncated"))?
        } else {
            u64::from(vm_state32)
        };
        let disk_size = if extra >= 16 { buf.be_u64(x + 8) } else { None };
        let icount = if extra >= 24 {
            buf.be_u64(x + 16).filter(|&v| v != u64::MAX)
        } else {
            None
        };
        let ids = x + extra_len;
        let id = buf
            .get(ids..ids + id_len)
            .ok_or(e("snapshot table truncated"))?;
        let name = buf
            .get(ids + id_len..ids + id_len + name_len)
            .ok_or(e("snapshot table truncated"))?;
        if l1_offset % cs != 0 || u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(e("Snapshot L1 table offset invalid"));
        }
        if l1_offset
            .checked_add(u64::from(l1_size) * 8)
            .is_none_or(|end| end > crate::disk::header::MAX_HOST_OFFSET)
        {
            return Err(e("Snapshot L1 table offset invalid"));
        }
        let raw = buf
            .get(off..ids + id_len + name_len)
            .ok_or(e("snapshot table truncated"))?
            .to_vec();
        out.push(Snapshot {
            raw,
            l1_offset,
            l1_size,
            disk_size,
            info: SnapshotInfo {
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                vm_state_size: vm_state,
                date_sec: u64::from(date_sec),
                date_nsec,
                vm_clock_nsec: vm_clock,
                icount,
                disk_size,
            },
        });
        off = (ids + id_len + name_len).next_multiple_of(8);
    }
    Ok((out, off as u64))
}
