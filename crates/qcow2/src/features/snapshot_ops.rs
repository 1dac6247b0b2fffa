//! Creating, deleting and applying internal snapshots (spec "Snapshots"), as
//! `qemu-img snapshot -c` / `-d` / `-a` do.
//!
//! Order: reference counts change first (a crash leaves leaks), the new snapshot table is
//! written to new clusters and flushed, then the header's `nb_snapshots` and
//! `snapshots_offset` (12 contiguous bytes) switch to it, and only then is the old table
//! freed. Between a refcount change and the matching COPIED-flag rewrite a crash can leave
//! flag mismatches that `check -r all` repairs (qemu has the same window).

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{DebugEvent, Error, Result, SnapshotInfo, report_failure};

use crate::device::Qcow2Device;
use crate::disk::snapshot::Snapshot;
use crate::disk::table::{OFLAG_COPIED, encode_u64s};
use crate::engine::meta::Meta;
use crate::engine::overlap::MetaKind;
use crate::errors::internal;
use crate::features::snapshot_refs::{EFBIG, Flags, update_refcounts};

/// qemu's `QCOW_MAX_SNAPSHOTS`.
const MAX_SNAPSHOTS: usize = 65536;

/// The index of the snapshot with id `id_or_name`, or else with that name (qemu's
/// lookup for `snapshot -a/-d`).
fn snapshot_index(m: &Meta, id_or_name: &str) -> Result<usize> {
    m.snapshots()
        .iter()
        .position(|s| s.info.id == id_or_name)
        .or_else(|| m.snapshots().iter().position(|s| s.info.name == id_or_name))
        .ok_or_else(|| Error::invalid(format!("Can't find snapshot '{id_or_name}'")))
}

/// Writes `snaps` as a new snapshot table and points the header at it, then frees the
/// old table and discards its clusters (as qemu's `qcow2_write_snapshots`, with
/// `QCOW2_DISCARD_SNAPSHOT`). The table is `snapshots_size` bytes, as qemu writes it:
/// entries start 8-aligned, the last one is not padded.
pub(crate) fn write_table(m: &mut Meta, snaps: Vec<Snapshot>) -> Result<()> {
    let cs = m.cs();
    let mut table = Vec::new();
    for s in &snaps {
        table.resize(table.len().next_multiple_of(8), 0);
        table.extend_from_slice(&s.raw);
    }
    let len = table.len() as u64;
    let off = if len == 0 {
        0
    } else {
        m.alloc_run(len.div_ceil(cs))?
    };
    if len > 0 {
        m.file().write_all_at(&table, off)?;
    }
    m.file().flush()?;
    let mut hdr = [0u8; 12];
    let nb = u32::try_from(snaps.len()).map_err(|_| Error::invalid("too many snapshots"))?;
    hdr.put_be_u32(0, nb);
    hdr.put_be_u64(4, off);
    m.file().write_all_at(&hdr, 60)?;
    m.file().flush()?;
    let (old_off, old_len) = (m.h().snapshots_offset, m.snapshot_table_len());
    m.replace_snapshots(snaps, off, len);
    m.note_meta(MetaKind::SnapshotTable, off, len);
    if old_len > 0 {
        // As qemu's `qcow2_free_clusters`: a failure leaks the old table, reported.
        m.file().debug_event(DebugEvent::ClusterFree);
        match m.unref_range(old_off, old_len) {
            Ok(()) => discard_freed(m, vec![(old_off, old_len)]),
            Err(e) => report_failure("qcow2_free_clusters failed", &e),
        }
    }
    Ok(())
}

/// Discards the clusters of `freed` that are free (refcount 0) in the image file, as
/// qemu passes the frees of snapshot operations down (`pass-discard-snapshot`, on by
/// default): the old data of a deleted snapshot does not stay readable in the file.
/// The refcount drops are flushed first, so a crash before or during the discard
/// leaves at worst a leaked cluster, never a live mapping to a punched one. A discard
/// is a hint: failures (of the flush too) only skip it, as qemu ignores them. Images
/// with an external data file are left alone (their data clusters lie in that file),
/// and so is every image opened with `pass-discard-snapshot=off`.
fn discard_freed(m: &mut Meta, freed: Vec<(u64, u64)>) {
    if freed.is_empty()
        || m.data().is_some()
        || m.keep_snapshot_frees()
        || m.file().flush().is_err()
    {
        return;
    }
    m.punch_freed(freed);
}

pub(crate) fn entry_raw(
    info: &SnapshotInfo,
    l1_offset: u64,
    l1_size: u32,
    disk_size: u64,
) -> Vec<u8> {
    let id = info.id.as_bytes();
    let name = info.name.as_bytes();
    let mut raw = vec![0u8; 40 + 24];
    raw.put_be_u64(0, l1_offset);
    raw.put_be_u32(8, l1_size);
    raw.put_be_u16(12, u16::try_from(id.len()).unwrap_or(0));
    raw.put_be_u16(14, u16::try_from(name.len()).unwrap_or(0));
    raw.put_be_u32(16, u32::try_from(info.date_sec).unwrap_or(u32::MAX));
    raw.put_be_u32(20, info.date_nsec);
    raw.put_be_u64(24, info.vm_clock_nsec);
    raw.put_be_u32(32, 0);
    raw.put_be_u32(36, 24);
    raw.put_be_u64(40, 0);
    raw.put_be_u64(48, disk_size);
    raw.put_be_u64(56, info.icount.unwrap_or(u64::MAX));
    raw.extend_from_slice(id);
    raw.extend_from_slice(name);
    raw
}

impl Qcow2Device {
    /// Takes an internal snapshot named `name` of the current disk state (as
    /// `qemu-img snapshot -c NAME`); returns its id.
    pub fn create_snapshot(&self, name: &str) -> Result<String> {
        self.writable()?;
        let mut m = self.lock();
        if m.data().is_some() {
            return Err(Error::unsupported(
                "qcow2",
                "internal snapshots with an external data file",
            ));
        }
        // With 1-bit refcounts (iotest 112) qemu takes a snapshot of an empty image and
        // fails with a refcount overflow (EINVAL) as soon as a cluster would be shared.
        // qemu allows several snapshots with one name (ids stay unique).
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::invalid(format!(
                "Could not create snapshot '{name}': invalid name"
            )));
        }
        if m.snapshots().len() >= MAX_SNAPSHOTS {
            return Err(Error::io(
                "the snapshot table is full",
                std::io::Error::from_raw_os_error(EFBIG),
            ));
        }
        m.commit_deferred()?;
        m.file().flush()?;
        let id = m
            .snapshots()
            .iter()
            .filter_map(|s| s.info.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let l1 = m.l1().to_vec();
        let cs = m.cs();
        // The snapshot's own L1 copy, flags and all (as qemu copies it before the
        // increment; they are cleared where it is applied).
        let n = l1.len() as u64;
        let l1_off = if n == 0 {
            0
        } else {
            m.alloc_run((n * 8).div_ceil(cs))?
        };
        if n > 0 {
            m.file().write_all_at(&encode_u64s(&l1), l1_off)?;
        }
        let at = Flags::TablesAndL1(m.l1_offset());
        update_refcounts(&mut m, &l1, 1, at, &mut Vec::new())?;
        m.file().flush()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let info = SnapshotInfo {
            id: id.to_string(),
            name: name.to_string(),
            vm_state_size: 0,
            date_sec: now.as_secs(),
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            icount: Some(0),
            disk_size: Some(m.size()),
        };
        let l1_size = u32::try_from(n).map_err(|_| Error::invalid("L1 size"))?;
        let snap = Snapshot {
            raw: entry_raw(&info, l1_off, l1_size, m.size()),
            l1_offset: l1_off,
            l1_size,
            disk_size: Some(m.size()),
            info,
        };
        m.note_meta(MetaKind::InactiveL1, l1_off, n * 8);
        let mut snaps = m.snapshots().to_vec();
        snaps.push(snap);
        write_table(&mut m, snaps)?;
        m.file().flush()?;
        Ok(id.to_string())
    }

    /// Deletes the internal snapshot with id (or else name) `id_or_name`, as
    /// `qemu-img snapshot -d`.
    pub fn delete_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.writable()?;
        let mut m = self.lock();
        let pos = snapshot_index(&m, id_or_name)?;
        if let Some(s) = m.snapshots().get(pos) {
            s.check_l1(m.cs())?;
        }
        m.commit_deferred()?;
        m.file().flush()?;
        let mut snaps = m.snapshots().to_vec();
        let snap = snaps.remove(pos);
        write_table(&mut m, snaps)?;
        // The snapshot is gone from the table: a failure from here on leaks clusters.
        let freed = |e: Error| match e {
            Error::Io { source, .. } => {
                Error::io("Failed to free the cluster and L1 table", source)
            }
            e => e,
        };
        let l1 = m
            .read_table(
                "Snapshot L1 table offset invalid",
                snap.l1_offset,
                u64::from(snap.l1_size),
            )
            .map_err(freed)?;
        let mut gone = Vec::new();
        update_refcounts(&mut m, &l1, -1, Flags::None, &mut gone).map_err(freed)?;
        if snap.l1_size > 0 {
            m.file().debug_event(DebugEvent::ClusterFree);
            let l1 = (snap.l1_offset, u64::from(snap.l1_size) * 8);
            match m.unref_range(l1.0, l1.1) {
                Ok(()) => gone.push(l1),
                Err(e) => report_failure("qcow2_free_clusters failed", &e),
            }
        }
        m.file().flush()?;
        discard_freed(&mut m, gone);
        // Now that the drops are durable, clusters left with one reference get their
        // COPIED flags back: in the deleted snapshot's L2 tables that another snapshot
        // or the active image still uses (as qemu's decrementing pass sets them), then
        // in the active tables.
        update_refcounts(&mut m, &l1, 0, Flags::Tables, &mut Vec::new())?;
        let (active, at) = (m.l1().to_vec(), Flags::TablesAndL1(m.l1_offset()));
        update_refcounts(&mut m, &active, 0, at, &mut Vec::new())?;
        m.file().flush()
    }

    /// Reverts the disk to snapshot `id_or_name` (as `qemu-img snapshot -a`); the
    /// snapshot is kept, and the disk takes the snapshot's virtual size.
    /// Refused, as by qemu, when the image has persistent dirty bitmaps (even disabled
    /// or inconsistent ones).
    pub fn apply_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.writable()?;
        if !self.bitmaps.is_empty() {
            return Err(Error::invalid("Device has active dirty bitmaps"));
        }
        let (snap, size) = {
            let m = self.lock();
            let i = snapshot_index(&m, id_or_name)?;
            let snap = m.snapshots().get(i).cloned();
            let snap = snap.ok_or(internal("qcow2: snapshot index"))?;
            snap.check_l1(m.cs())?;
            (snap, m.size())
        };
        // As qemu: the disk first takes the snapshot's size (shrinking drops the active
        // tree's clusters beyond it; the L1 table grows for a larger one).
        if let Some(d) = snap.disk_size.filter(|&d| d != size) {
            crate::features::resize::resize(
                self,
                d,
                diskimg_blockio::Preallocation::Off,
                true,
                false,
            )?;
        }
        let mut m = self.lock();
        m.commit_deferred()?;
        m.file().flush()?;
        let sl1 = m.read_table(
            "Snapshot L1 table offset invalid",
            snap.l1_offset,
            u64::from(snap.l1_size),
        )?;
        if sl1.len() > m.l1().len() {
            crate::features::resize::grow_l1(self, &mut m, sl1.len() as u64)?;
        }
        // The snapshot's clusters gain the active image's reference first (leaks only).
        let at = Flags::TablesAndL1(snap.l1_offset);
        update_refcounts(&mut m, &sl1, 1, at, &mut Vec::new())?;
        m.file().flush()?;
        let old = m.l1().to_vec();
        let mut new = vec![0u64; old.len()];
        for (d, s) in new.iter_mut().zip(sl1.iter()) {
            *d = *s & !OFLAG_COPIED;
        }
        m.write_l1(new)?;
        let mut gone = Vec::new();
        update_refcounts(&mut m, &old, -1, Flags::None, &mut gone)?;
        m.file().flush()?;
        discard_freed(&mut m, gone);
        // The flags the drops justify, once durable (as in `delete_snapshot`).
        update_refcounts(&mut m, &old, 0, Flags::Tables, &mut Vec::new())?;
        let (active, at) = (m.l1().to_vec(), Flags::TablesAndL1(m.l1_offset()));
        update_refcounts(&mut m, &active, 0, at, &mut Vec::new())?;
        m.file().flush()
    }
}

/// `s` with the extra data v3 requires (VM state size and disk size, 16 bytes; written
/// as qemu writes entries, 24 bytes with the icount) when it lacks them; `size`: the
/// disk size of entries without one.
pub(crate) fn completed(mut s: Snapshot, size: u64) -> Snapshot {
    if extra_len(&s.raw) < 16 {
        let disk = s.disk_size.unwrap_or(size);
        s.raw = with_vm_state(&s.info, entry_raw(&s.info, s.l1_offset, s.l1_size, disk));
        s.disk_size = Some(disk);
    }
    s
}

/// The extra data size of a stored entry.
pub(crate) fn extra_len(raw: &[u8]) -> u32 {
    raw.get(36..40)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

fn with_vm_state(info: &SnapshotInfo, mut raw: Vec<u8>) -> Vec<u8> {
    let v = info.vm_state_size;
    if let Some(b) = raw.get_mut(32..36) {
        b.copy_from_slice(&u32::try_from(v).unwrap_or(0).to_be_bytes());
    }
    if let Some(b) = raw.get_mut(40..48) {
        b.copy_from_slice(&v.to_be_bytes());
    }
    raw
}
