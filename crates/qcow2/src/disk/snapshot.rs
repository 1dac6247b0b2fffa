//! Internal snapshots (spec "Snapshots"): the snapshot table, read-only.

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
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

/// What reading the table for `check -r all` dropped (qemu's `qcow2_do_read_snapshots`
/// with `repair`): the entries are kept in memory as repaired.
#[derive(Debug, Default)]
pub(crate) struct TableRepairs {
    /// Snapshots removed off the end because the table was too big.
    pub reduced: u32,
    /// Entries whose unknown extra data was cut to qemu's 1024 bytes.
    pub extra_dropped: u32,
    /// qemu's lines about them.
    pub messages: Vec<String>,
}

/// Reads parts of the table through a window (what lies past the end of the file reads
/// as zeros, as qemu's reads do).
struct Window<'a> {
    file: &'a dyn Storage,
    file_len: u64,
    at: u64,
    buf: Vec<u8>,
}

impl Window<'_> {
    const SIZE: u64 = 256 << 10;

    /// `len` bytes at `off` (at most 64 KiB + 40).
    fn get(&mut self, off: u64, len: usize) -> Result<&[u8]> {
        let n = len as u64;
        let end = off
            .checked_add(n)
            .ok_or(bad("snapshot table offset", off))?;
        if off < self.at || end > self.at + self.buf.len() as u64 {
            let size = Self::SIZE.max(n);
            self.buf = vec![0u8; idx(size)];
            let have = self.file_len.saturating_sub(off).min(size);
            if let Some(head) = self.buf.get_mut(..idx(have)).filter(|h| !h.is_empty()) {
                self.file.read_exact_at(head, off)?;
            }
            self.at = off;
        }
        let s = idx(off - self.at);
        self.buf.get(s..s + len).ok_or(bad("snapshot table", off))
    }
}

fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Reads the snapshot table (qemu's `qcow2_read_snapshots`): entries of too much extra
/// data or a table over 64 MiB are refused, with the hint qemu gives. Returns the
/// entries and the table's length in the file.
pub(crate) fn read_snapshots(
    file: &dyn Storage,
    h: &Header,
    limits: &diskimg_blockio::Limits,
) -> Result<(Vec<Snapshot>, u64)> {
    read_table(file, h, limits, None)
}

/// [`read_snapshots`] for `check -r all`: too much extra data is cut and overhanging
/// snapshots are dropped (counted and told in `fixes`), as qemu repairs them.
pub(crate) fn read_snapshots_repairing(
    file: &dyn Storage,
    h: &Header,
    limits: &diskimg_blockio::Limits,
    fixes: &mut TableRepairs,
) -> Result<(Vec<Snapshot>, u64)> {
    read_table(file, h, limits, Some(fixes))
}

fn read_table(
    file: &dyn Storage,
    h: &Header,
    limits: &diskimg_blockio::Limits,
    mut repair: Option<&mut TableRepairs>,
) -> Result<(Vec<Snapshot>, u64)> {
    let base = h.snapshots_offset;
    let mut w = Window {
        file,
        file_len: file.len()?,
        at: 0,
        buf: Vec::new(),
    };
    let mut out = Vec::new();
    let (mut off, mut table_len, mut bytes) = (base, 0u64, 0u64);
    for i in 0..h.nb_snapshots {
        let pre = off;
        table_len = table_len.next_multiple_of(8);
        off = off.next_multiple_of(8);
        let hd = w.get(off, 40)?.to_vec();
        let field = |o: usize| hd.be_u32(o).unwrap_or(0);
        let mut extra = field(36);
        let mut cut = false;
        if extra > MAX_EXTRA {
            let Some(fix) = repair.as_deref_mut() else {
                return Err(Error::corrupt(
                    "qcow2",
                    format!(
                        "Too much extra metadata in snapshot table entry {i}\nYou can \
                         force-remove this extra metadata with qemu-img check -r all"
                    ),
                    off,
                ));
            };
            fix.messages.push(format!(
                "Discarding too much extra metadata in snapshot table entry {i} ({extra} > \
                 {MAX_EXTRA})"
            ));
            fix.extra_dropped += 1;
            cut = true;
        }
        let (id_len, name_len) = (
            usize::from(hd.be_u16(12).unwrap_or(0)),
            usize::from(hd.be_u16(14).unwrap_or(0)),
        );
        let skip = u64::from(extra);
        if cut {
            extra = MAX_EXTRA;
        }
        let x = w.get(off + 40, idx(u64::from(extra)))?.to_vec();
        let ids_at = off + 40 + skip;
        let names = w.get(ids_at, id_len + name_len)?.to_vec();
        off = ids_at + (id_len + name_len) as u64;
        table_len += 40 + u64::from(extra) + (id_len + name_len) as u64;
        if table_len > MAX_SNAPSHOT_TABLE || off - base > i32::MAX as u64 {
            let over = h.nb_snapshots - i;
            let Some(fix) = repair.as_deref_mut() else {
                return Err(Error::corrupt(
                    "qcow2",
                    format!(
                        "Snapshot table is too big\nYou can force-remove all {over} \
                         overhanging snapshots with qemu-img check -r all"
                    ),
                    base,
                ));
            };
            fix.messages.push(format!(
                "Discarding {over} overhanging snapshots (snapshot table is too big)"
            ));
            fix.reduced += over;
            off = pre;
            break;
        }
        let mut raw = hd.clone();
        raw.put_be_u32(36, extra);
        raw.extend_from_slice(&x);
        raw.extend_from_slice(&names);
        bytes += raw.len() as u64;
        if bytes > limits.max_metadata_bytes {
            return Err(Error::LimitExceeded {
                what: "snapshot table",
                requested: bytes,
                limit: limits.max_metadata_bytes,
            });
        }
        out.push(entry(raw, &hd, &x, extra, id_len));
    }
    Ok((out, off - base))
}

/// One entry from its stored bytes (`raw`: header, extra data, id and name).
fn entry(raw: Vec<u8>, hd: &[u8], x: &[u8], extra: u32, id_len: usize) -> Snapshot {
    let vm_state = if extra >= 8 {
        x.be_u64(0).unwrap_or(0)
    } else {
        u64::from(hd.be_u32(32).unwrap_or(0))
    };
    let disk_size = if extra >= 16 { x.be_u64(8) } else { None };
    let icount = if extra >= 24 {
        x.be_u64(16).filter(|&v| v != u64::MAX)
    } else {
        None
    };
    let names = raw.get(40 + idx(u64::from(extra))..).unwrap_or(&[]);
    let (id, name) = names.split_at(id_len.min(names.len()));
    // C strings to qemu: what follows a NUL is not part of the id or name.
    let cstr =
        |b: &[u8]| String::from_utf8_lossy(b.split(|&c| c == 0).next().unwrap_or(&[])).into_owned();
    Snapshot {
        l1_offset: hd.be_u64(0).unwrap_or(0),
        l1_size: hd.be_u32(8).unwrap_or(0),
        disk_size,
        info: SnapshotInfo {
            id: cstr(id),
            name: cstr(name),
            vm_state_size: vm_state,
            date_sec: u64::from(hd.be_u32(16).unwrap_or(0)),
            date_nsec: hd.be_u32(20).unwrap_or(0),
            vm_clock_nsec: hd.be_u64(24).unwrap_or(0),
            icount,
            disk_size,
        },
        raw,
    }
}
