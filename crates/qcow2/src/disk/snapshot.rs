//! Internal snapshots (spec "Snapshots"): the snapshot table, read-only.

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{Error, Result, SnapshotInfo, Storage};

use crate::disk::header::{Header, MAX_HOST_OFFSET, MAX_L1_BYTES};

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

/// Why a snapshot's L1 table cannot be used, as qemu's `qcow2_validate_table` of the
/// "Snapshot L1 table" says it when the snapshot is used (listing, opening the image
/// and taking new snapshots do not look at it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum L1Problem {
    /// More entries than qemu's `QCOW_MAX_L1_SIZE` (32 MiB) holds (`EFBIG`).
    TooLarge,
    /// Not cluster-aligned, or ending beyond the largest host offset (`EINVAL`).
    OffsetInvalid,
}

impl L1Problem {
    /// qemu's words.
    pub(crate) fn words(self) -> &'static str {
        match self {
            L1Problem::TooLarge => "Snapshot L1 table too large",
            L1Problem::OffsetInvalid => "Snapshot L1 table offset invalid",
        }
    }

    /// The errno qemu returns with them (Linux numbers: `EFBIG`, `EINVAL`).
    pub(crate) fn errno(self) -> i32 {
        match self {
            L1Problem::TooLarge => 27,
            L1Problem::OffsetInvalid => 22,
        }
    }
}

impl Snapshot {
    /// What is wrong with this snapshot's L1 table reference, if anything.
    pub(crate) fn l1_problem(&self, cluster_size: u64) -> Option<L1Problem> {
        let bytes = u64::from(self.l1_size) * 8;
        if bytes > MAX_L1_BYTES {
            return Some(L1Problem::TooLarge);
        }
        let beyond = self
            .l1_offset
            .checked_add(bytes)
            .is_none_or(|end| end > MAX_HOST_OFFSET);
        (beyond || !self.l1_offset.is_multiple_of(cluster_size)).then_some(L1Problem::OffsetInvalid)
    }

    /// The snapshot's L1 table reference, validated ([`Error::Corrupt`] in qemu's words
    /// otherwise) before the snapshot is used.
    pub(crate) fn check_l1(&self, cluster_size: u64) -> Result<()> {
        match self.l1_problem(cluster_size) {
            Some(p) => Err(bad(p.words(), self.l1_offset)),
            None => Ok(()),
        }
    }
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
    // As qemu's reads, the part of the table beyond the end of the file reads as
    // zeros (empty entries of 40 bytes each; the header allows 65536 of them).
    let claimed = u64::from(h.nb_snapshots) * 40;
    let in_file = file_len.saturating_sub(base).min(MAX_SNAPSHOT_TABLE);
    let mut buf = limits.alloc(
        "snapshot table",
        in_file.max(claimed).min(MAX_SNAPSHOT_TABLE),
    )?;
    if let Some(head) = buf.get_mut(..usize::try_from(in_file).unwrap_or(0)) {
        file.read_exact_at(head, base)?;
    }
    let mut off = 0usize;
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
