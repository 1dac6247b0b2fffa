//! `amend`: change options of an existing image as `qemu-img amend -o` does for qcow2:
//! `compat` (1.1 → 0.10 with zero-cluster expansion, refused where qemu refuses, and
//! 0.10 → 1.1), `lazy_refcounts`, `size` and `refcount_bits` (the refcount structures
//! are rewritten at the new width, `rebuild::change_order`), `data_file` (renaming the
//! external data file) and `data_file_raw=off`. `encrypt.*` options (LUKS key slots) are
//! `keyslots.rs`'s; the [`Amend`](diskimg_blockio::Amend) capability routes them there.
//! Backing file changes are refused as in qemu 10 (use rebase).

use diskimg_blockio::{BlockDevice, Error, OptionList, Preallocation, Result};

use crate::create::options::{Compat, Keys, Verb, check_refcount_width};
use crate::device::Qcow2Device;
use crate::disk::ext::Extensions;
use crate::disk::header::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_RAW, COMPAT_LAZY, INCOMPAT_COMPRESSION, INCOMPAT_DIRTY,
    V3_HEADER_LEN,
};
use crate::disk::idx;
use crate::disk::table::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use crate::engine::deferred::L2Update;
use crate::engine::meta::{Meta, write_header};
use crate::features::amend_progress::{Progress, Widths, refcount_walks};
use crate::features::snapshot_ops::{completed, extra_len, write_table};

/// Options `amend` accepts but only `create` can apply (qemu's wording).
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
];

/// qemu's refusal of the options only `create` applies.
fn refuse_create_only(o: &OptionList) -> Result<()> {
    match CREATE_ONLY.iter().find(|k| o.get(k).is_some()) {
        Some(k) => Err(Error::invalid(format!(
            "Invalid parameter '{k}'\nThis option is only supported for image creation"
        ))),
        None => Ok(()),
    }
}

const NEEDS_V3: &str = "compatibility level 1.1 and above (use compat=1.1 or greater)";

/// What a walk over every L2 table (active and snapshots) found.
#[derive(Default)]
struct Scan {
    compressed: bool,
    snapshot_zero: bool,
    /// Guest offsets of active zero clusters: (offset, has a host cluster).
    active_zero: Vec<(u64, bool)>,
}

impl Qcow2Device {
    /// Applies `qemu-img amend -o` options (see the module docs for what is supported).
    pub fn amend(&self, opts: &OptionList) -> Result<()> {
        self.amend_with_progress(opts, false, &mut |_, _| {})
    }

    /// [`Qcow2Device::amend`] reporting `progress(done, total)` as qemu's qcow2 driver
    /// does (see `amend_progress`); `encryption` says key-slot options follow (one more
    /// operation in qemu's count).
    pub fn amend_with_progress(
        &self,
        opts: &OptionList,
        encryption: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        self.writable()?;
        let mut o = opts.clone();
        refuse_create_only(&o)?;
        let (cur_version, cur_lazy, refcount_order, has_data_file) = {
            let m = self.lock();
            (
                m.h().version,
                m.h().compatible & COMPAT_LAZY != 0,
                m.h().refcount_order,
                m.data().is_some(),
            )
        };
        let keys = Keys::take(&mut o, Verb::Amend)?;
        let version = keys.compat.map_or(cur_version, Compat::version);
        let lazy = keys.lazy_refcounts;
        let size = o.take_size("size")?;
        let refcount_bits = keys.refcount_bits;
        let backing = self.changes_backing(&keys);
        let data_file = keys.data_file;
        let data_file_raw = keys.data_file_raw;
        let encrypt = o.entries().iter().any(|(k, _)| k.starts_with("encrypt."));
        if let Some((k, _)) = o.entries().iter().find(|(k, _)| !k.starts_with("encrypt.")) {
            return Err(Error::invalid(format!("Invalid parameter '{k}'")));
        }
        if backing {
            return Err(Error::invalid(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
            ));
        }
        if let Some(bits) = refcount_bits {
            check_refcount_width(bits)?;
            if version < 3 && bits != 16 {
                return Err(Error::invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                ));
            }
        }
        let new_order = refcount_bits.map_or(refcount_order, u64::trailing_zeros);
        let (hdr_data_file, cur_raw) = {
            let m = self.lock();
            (
                m.h().has_data_file(),
                m.h().autoclear & AUTOCLEAR_DATA_RAW != 0,
            )
        };
        if data_file.is_some() && !hdr_data_file {
            return Err(Error::invalid(
                "data-file can only be set for images that use an external data file",
            ));
        }
        if data_file_raw == Some(true) && !cur_raw {
            return Err(Error::invalid(
                "data-file-raw cannot be set on existing images",
            ));
        }
        if encrypt {
            return Err(Error::unsupported("qcow2", "amending encryption options"));
        }
        let lazy_after = lazy.unwrap_or(cur_lazy && version >= 3);
        if version < 3 && lazy == Some(true) {
            return Err(Error::invalid(format!(
                "Lazy refcounts only supported with {NEEDS_V3}"
            )));
        }
        if version < cur_version {
            if new_order != 4 {
                return Err(Error::invalid("compat=0.10 requires refcount_bits=16"));
            }
            if has_data_file {
                return Err(Error::invalid("Cannot downgrade an image with a data file"));
            }
        }
        let ops = u64::from(version != cur_version)
            + u64::from(new_order != refcount_order)
            + u64::from(encryption);
        let mut progress = Progress::new(progress, ops);
        if version > cur_version {
            self.upgrade()?;
            progress.upgrade();
        }
        if new_order != refcount_order {
            self.change_width(refcount_order, new_order, &mut progress)?;
        }
        if lazy_after != cur_lazy && version >= 3 {
            self.set_lazy(lazy_after)?;
        }
        if data_file.is_some() || (data_file_raw == Some(false) && cur_raw) {
            // As qemu: a new name for the external data file (an empty one drops the
            // name, the file must then be given at open), or data_file_raw cleared.
            let mut m = self.lock();
            let mut h = m.h().clone();
            if let Some(name) = data_file {
                h.ext.data_file = Some(name).filter(|n| !n.is_empty());
            }
            if data_file_raw == Some(false) {
                h.autoclear &= !AUTOCLEAR_DATA_RAW;
            }
            crate::engine::meta::write_header(&mut m, &mut h)?;
        }
        if let Some(s) = size
            && s != self.virtual_size()
        {
            self.resize(s, Preallocation::Off, true)?;
        }
        if version < cur_version {
            self.downgrade(&mut progress)?;
        }
        self.flush()
    }

    /// The refcount width change from `2^from` to `2^to` bits, with qemu's reports.
    fn change_width(&self, from: u32, to: u32, progress: &mut Progress<'_>) -> Result<()> {
        let mut walks = |m: &Meta, refs: &[u64]| {
            let w = Widths {
                cs: m.cs(),
                reftable: u64::from(m.h().refcount_table_clusters) * m.cs() / 8,
                old_bits: 1 << from.min(6),
                new_bits: 1 << to.min(6),
            };
            progress.refcount_walks(refcount_walks(refs, &w), w.reftable);
        };
        crate::engine::rebuild::change_order(&mut self.lock(), to, &mut walks)
    }

    fn set_lazy(&self, on: bool) -> Result<()> {
        let dirty = self.lock().h().incompatible & INCOMPAT_DIRTY != 0;
        if !on && dirty {
            crate::features::check::check(self, diskimg_blockio::RepairMode::All)?;
        }
        let mut m = self.lock();
        m.commit_deferred()?;
        let mut h = m.h().clone();
        if on {
            h.compatible |= COMPAT_LAZY;
        } else {
            h.compatible &= !COMPAT_LAZY;
            h.incompatible &= !INCOMPAT_DIRTY;
        }
        write_header(&mut m, &mut h)
    }

    /// 0.10 → 1.1: a v3 header with qemu's feature table; snapshot entries get the
    /// extra data v3 requires.
    fn upgrade(&self) -> Result<()> {
        let mut m = self.lock();
        m.commit_deferred()?;
        let size = m.size();
        let snaps = m.snapshots().to_vec();
        if snaps
            .iter()
            .any(|s| s.raw.len() < 40 || extra_len(&s.raw) < 16)
        {
            let fixed = snaps.into_iter().map(|s| completed(s, size)).collect();
            write_table(&mut m, fixed)?;
        }
        let mut h = m.h().clone();
        h.version = 3;
        h.header_length = V3_HEADER_LEN;
        h.refcount_order = 4;
        h.incompatible = 0;
        h.compatible = 0;
        h.autoclear = 0;
        h.compression_type = 0;
        h.ext.features = Extensions::qemu_feature_table_for(m.cs());
        write_header(&mut m, &mut h)
    }

    /// 1.1 → 0.10: zero clusters expanded, v3-only features refused, v2 header.
    fn downgrade(&self, progress: &mut Progress<'_>) -> Result<()> {
        let (dirty, bitmaps) = {
            let m = self.lock();
            (
                m.h().incompatible & INCOMPAT_DIRTY != 0,
                m.h().autoclear & AUTOCLEAR_BITMAPS != 0 && m.h().ext.bitmaps.is_some(),
            )
        };
        if dirty {
            crate::features::check::check(self, diskimg_blockio::RepairMode::All)?;
        }
        if bitmaps {
            return Err(Error::unsupported(
                "qcow2",
                "downgrading an image with persistent bitmaps",
            ));
        }
        let (incompat, zstd) = {
            let m = self.lock();
            (
                m.h().incompatible & !INCOMPAT_DIRTY,
                m.h().compression_type != 0,
            )
        };
        if incompat & !INCOMPAT_COMPRESSION != 0 {
            return Err(Error::invalid(format!(
                "Cannot downgrade an image with incompatible features {:#x} set",
                incompat & !INCOMPAT_COMPRESSION
            )));
        }
        {
            // v2 snapshots have no size of their own: they must have the disk's.
            let m = self.lock();
            if m.snapshots()
                .iter()
                .any(|s| s.disk_size.is_some_and(|d| d != m.size()))
            {
                return Err(Error::invalid(
                    "Internal snapshots prevent downgrade of image",
                ));
            }
        }
        let scan = self.scan()?;
        if zstd && scan.compressed {
            return Err(Error::invalid(
                "Cannot downgrade an image with zstd compression type and existing compressed \
                 clusters",
            ));
        }
        progress.downgrade({
            let m = self.lock();
            let snaps: u64 = m.snapshots().iter().map(|s| u64::from(s.l1_size)).sum();
            m.l1().len() as u64 + snaps
        });
        self.expand_zero_clusters(&scan.active_zero)?;
        if scan.snapshot_zero {
            self.expand_snapshot_zero_clusters()?;
        }
        let mut m = self.lock();
        m.commit_deferred()?;
        let mut h = m.h().clone();
        h.version = 2;
        h.incompatible = 0;
        h.compatible = 0;
        h.autoclear = 0;
        h.compression_type = 0;
        h.refcount_order = 4;
        h.ext.features.clear();
        h.ext.bitmaps = None;
        write_header(&mut m, &mut h)
    }

    /// Zero clusters cannot be expressed in v2: ones with a host cluster get zeroes
    /// written there, plain ones become unallocated (no backing) or zero-filled data.
    fn expand_zero_clusters(&self, zeros: &[(u64, bool)]) -> Result<()> {
        let has_backing = self.lock().h().backing_file.is_some();
        let cs = self.lock().cs();
        let size = self.virtual_size();
        let buf = vec![0u8; idx(cs)];
        for &(guest, allocated) in zeros {
            let n = cs.min(size.saturating_sub(guest));
            if allocated || has_backing {
                // A plain write replaces the zero flag by data.
                self.write_at(buf.get(..idx(n)).unwrap_or(&[]), guest)?;
            } else {
                let mut m = self.lock();
                let l1i = guest / m.h().l1_coverage();
                let i = (guest / cs) % m.h().l2_entries();
                let l2 = crate::write::ensure_l2(&mut m, l1i)?;
                m.defer(vec![L2Update::new(l2, i, 0, 0)], Vec::new(), false)?;
            }
        }
        let mut m = self.lock();
        m.commit_deferred()?;
        m.file().flush()?;
        Ok(())
    }

    /// Whether `backing_file`/`backing_fmt` options ask for a change, which qemu refuses:
    /// given, both must name what the image has (an option left out names nothing).
    fn changes_backing(&self, keys: &Keys) -> bool {
        if keys.backing_file.is_none() && keys.backing_fmt.is_none() {
            return false;
        }
        let m = self.lock();
        keys.backing_file.as_deref() != m.h().backing_file.as_deref()
            || keys.backing_fmt.as_deref() != m.h().ext.backing_format.as_deref()
    }

    /// The zero clusters the snapshots' L2 tables still hold (those shared with the
    /// active table were expanded with it), expanded as qemu's
    /// `expand_zero_clusters_in_l1` does for inactive tables: a plain zero cluster
    /// becomes unallocated without a backing file, else a new cluster of zeroes with the
    /// L2 table's refcount; a preallocated one gets zeroes written and stays. The entry
    /// is COPIED when its L2 table is not shared.
    fn expand_snapshot_zero_clusters(&self) -> Result<()> {
        let has_backing = self.lock().h().backing_file.is_some() || self.backing().is_some();
        let mut m = self.lock();
        let cs = m.cs();
        let zeroes = vec![0u8; idx(cs)];
        for s in m.snapshots().to_vec() {
            s.check_l1(cs)?;
            let l1 = m.read_table("snapshot L1 table", s.l1_offset, u64::from(s.l1_size))?;
            for l2 in l1.iter().map(|e| e & L1E_OFFSET_MASK).filter(|&o| o != 0) {
                let shared = m.refcount(l2 / cs)?;
                let mut t = m.l2_table(l2)?.clone();
                let mut dirty = false;
                for e in t.iter_mut() {
                    if *e & OFLAG_COMPRESSED != 0 || *e & OFLAG_ZERO == 0 {
                        continue;
                    }
                    let mut host = *e & L2E_OFFSET_MASK;
                    dirty = true;
                    if host == 0 && !has_backing {
                        *e = 0;
                        continue;
                    }
                    if host == 0 {
                        host = m.alloc_run(1)?;
                        if shared > 1 {
                            m.set_refcount(host / cs, shared)?;
                        }
                    }
                    m.check_overlap(host, cs)?;
                    m.file().write_all_at(&zeroes, host)?;
                    *e = host | if shared == 1 { OFLAG_COPIED } else { 0 };
                }
                if dirty {
                    m.file().flush()?;
                    m.write_l2_table(l2, t)?;
                }
            }
        }
        m.file().flush()
    }

    fn scan(&self) -> Result<Scan> {
        let mut m = self.lock();
        m.commit_deferred()?;
        let cs = m.cs();
        let per = m.h().l2_entries();
        let mut out = Scan::default();
        let mut l1s = vec![(m.l1().to_vec(), true)];
        let snaps = m.snapshots().to_vec();
        for s in &snaps {
            s.check_l1(cs)?;
            let t = m.read_table("snapshot L1 table", s.l1_offset, u64::from(s.l1_size))?;
            l1s.push((t, false));
        }
        for (l1, active) in l1s {
            for (l1i, e) in l1.iter().enumerate() {
                let l2 = e & L1E_OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let t = m.l2_table(l2)?.clone();
                for (i, &x) in t.iter().enumerate() {
                    if x & OFLAG_COMPRESSED != 0 {
                        out.compressed = true;
                    } else if x & OFLAG_ZERO != 0 {
                        if active {
                            let guest = (l1i as u64 * per + i as u64) * cs;
                            out.active_zero.push((guest, x & L2E_OFFSET_MASK != 0));
                        } else {
                            out.snapshot_zero = true;
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}
