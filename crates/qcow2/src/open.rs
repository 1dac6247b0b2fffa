//! Opening an image: [`Qcow2Device::open`] / [`Qcow2Device::open_with`] (header, L1 and
//! refcount tables, snapshots, bitmaps, encryption, the external data file, and the
//! repairs qemu makes on a read-write open) and the read-only views of internal
//! snapshots ([`Qcow2Device::open_snapshot`]).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use diskimg_blockio::{BlockDevice, Error, FilePurpose, OpenOptions, RepairMode, Result, Storage};

use crate::device::Qcow2Device;
use crate::disk::bitmap_dir::{
    check_ext as check_bitmaps_ext, parse_bitmap_directory, read_directory_bytes,
};
use crate::disk::header::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_RAW, COMPAT_LAZY, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};
use crate::disk::snapshot::read_snapshots;
use crate::encryption::Encryption;
use crate::engine::meta::Meta;
use crate::engine::overlap::MetaKind::{InactiveL1, SnapshotTable};
use crate::open_options::Qcow2OpenOptions;

impl Qcow2Device {
    /// Opens the image on `file` (see [`crate::DRIVER`] for the options honoured; the
    /// driver options are read by [`Qcow2OpenOptions::from_options`]).
    pub fn open(file: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        // qemu's runtime options are checked against the header before anything else.
        let len = file.len()?;
        if len >= 72 {
            let mut first = vec![0u8; usize::try_from(len.min(64 << 10)).unwrap_or(72)];
            file.read_exact_at(&mut first, 0)?;
            if let Ok(h) = Header::parse(&first) {
                crate::runtime_options::check(
                    &opts.driver_options,
                    1u64 << h.cluster_bits.min(63),
                    h.size,
                    h.version,
                )?;
            }
        }
        let dev = Self::open_with(file, opts, &Qcow2OpenOptions::from_options(opts))?;
        // The runtime option overrides the image's lazy_refcounts bit (qemu's
        // `lazy-refcounts`; version 2 refusing `on` was checked above).
        if let Some(v) = opts.driver_options.get("lazy-refcounts")
            && !dev.read_only
            && !dev.snapshot_view
        {
            dev.lock().set_lazy_refcounts(v == "on")?;
        }
        Ok(dev)
    }

    /// Opens the image on `file` with typed qcow2 options (`opts.driver_options` is not
    /// read).
    pub fn open_with(
        file: Arc<dyn Storage>,
        opts: &OpenOptions,
        q: &Qcow2OpenOptions,
    ) -> Result<Self> {
        let file_len = file.len()?;
        if file_len < 72 {
            return Err(crate::errors::not_qcow2());
        }
        let mut first = vec![0u8; usize::try_from(file_len.min(2 << 20)).unwrap_or(4096)];
        file.read_exact_at(&mut first, 0)?;
        let h = Header::parse(&first)?;
        if !q.check {
            h.validate_snapshot_table("Snapshot table")?;
        }
        let crypt = Encryption::open(file.as_ref(), &h, q, &opts.secrets)?.map(Arc::new);
        let read_only = opts.read_only || file.is_read_only();
        let checking = q.check;
        if h.incompatible & INCOMPAT_CORRUPT != 0 && !read_only && !checking {
            return Err(Error::invalid(
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        let bitmap_edit = q.bitmap_edit;
        let data = open_data_file(&h, opts, q, read_only)?;
        let limits = opts.limits;
        let cs = h.cluster_size();
        let mut meta = Meta::new(file.clone(), data.clone(), h, limits);
        meta.set_deferred_tables(q.deferred_tables && !read_only);
        meta.set_read_only(read_only);
        meta.set_keep_snapshot_frees(q.keep_snapshot_frees);
        let (l1_off, l1_n) = (meta.h().l1_table_offset, u64::from(meta.h().l1_size));
        meta.load_l1("Active L1 table offset invalid", l1_off, l1_n)?;
        meta.load_reftable()?;
        // Opened for `check`, a table qemu refuses is the check's business (it reads it
        // again and says what is wrong).
        let (snapshots, snapshot_table_len) = match read_snapshots(file.as_ref(), meta.h(), &limits)
        {
            Err(e) if checking && e.is_bad_image() => (Vec::new(), 0),
            r => r?,
        };
        if !read_only {
            meta.collect_meta();
            meta.note_meta(SnapshotTable, meta.h().snapshots_offset, snapshot_table_len);
            for s in snapshots.iter().filter(|s| s.l1_problem(cs).is_none()) {
                meta.note_meta(InactiveL1, s.l1_offset, u64::from(s.l1_size) * 8);
            }
        }
        meta.set_snapshots(snapshots, snapshot_table_len);
        if !read_only && q.inactive_l2_check {
            meta.check_inactive_l2();
        }
        let bitmaps = match meta.h().ext.bitmaps {
            Some(b) if meta.h().autoclear & AUTOCLEAR_BITMAPS != 0 => {
                check_bitmaps_ext(&b, cs)?;
                let buf = read_directory_bytes(file.as_ref(), &limits, &b)?;
                let dir = parse_bitmap_directory(
                    &buf,
                    b.directory_offset,
                    b.nb_bitmaps,
                    cs,
                    meta.size(),
                )?;
                crate::features::bitmap::check_tables(&meta, &dir)?;
                dir
            }
            _ => Vec::new(),
        };
        let mut dev = Qcow2Device {
            size: AtomicU64::new(meta.size()),
            epoch: meta.epoch().clone(),
            meta: crossbeam_utils::sync::ShardedLock::new(meta),
            file,
            data,
            backing: RwLock::new(None),
            backing_epoch: diskimg_blockio::BackingEpoch::default(),
            read_only,
            bitmaps,
            tracked: Mutex::new(Vec::new()),
            closed: diskimg_blockio::Closed::new(),
            open_repairs: Mutex::new(Vec::new()),
            snapshot_view: false,
            crypt,
            prealloc_map: std::sync::OnceLock::new(),
            behind: crate::behind::Behind::new(!q.no_write_behind),
        };
        if !read_only && checking {
            // A repair open (BDRV_O_CHECK) still drops the autoclear bits we cannot
            // keep, as qemu's; the dirty-image repair is the check's own business.
            dev.clear_unknown_autoclear()?;
        }
        if !read_only && !checking {
            dev.open_rw_fixups()?;
            let lazy = {
                let m = dev.lock();
                m.h().version >= 3 && m.h().compatible & COMPAT_LAZY != 0
            };
            dev.lock().set_lazy_refcounts(lazy)?;
            let view = q.snapshot_view();
            if !bitmap_edit && !view && !dev.bitmaps.is_empty() {
                let tracked = crate::features::dirty::load(&mut dev.lock())?;
                for b in dev.bitmaps.iter_mut() {
                    b.in_use |= tracked.iter().any(|t| t.name == b.name);
                }
                *dev.tracked.get_mut().unwrap_or_else(|e| e.into_inner()) = tracked;
            }
        }
        if q.snapshot_view() {
            return dev.snapshot_view(q.snapshot_id.as_deref(), q.snapshot_name.as_deref());
        }
        Ok(dev)
    }

    /// Clears the autoclear bits we cannot maintain (qemu's QCOW2_AUTOCLEAR_MASK).
    fn clear_unknown_autoclear(&self) -> Result<()> {
        let mut m = self.lock();
        let autoclear = m.h().autoclear;
        let keep = autoclear & (AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_RAW);
        if keep != autoclear {
            m.write_autoclear(keep)?;
        }
        Ok(())
    }

    /// Clears autoclear bits we cannot maintain and repairs a dirty (lazy refcounts)
    /// image, as qemu does on a read-write open.
    fn open_rw_fixups(&self) -> Result<()> {
        let (dirty, autoclear) = {
            let m = self.lock();
            (m.h().incompatible & INCOMPAT_DIRTY != 0, m.h().autoclear)
        };
        self.clear_unknown_autoclear()?;
        // A program lacking bitmap support cleared the autoclear bit: the bitmaps are
        // inconsistent and qemu drops the extension (their clusters leak).
        if autoclear & AUTOCLEAR_BITMAPS == 0 {
            let mut m = self.lock();
            if m.h().ext.bitmaps.is_some() {
                let mut h = m.h().clone();
                h.ext.bitmaps = None;
                crate::engine::meta::write_header(&mut m, &mut h)?;
            }
        }
        if dirty {
            let report = crate::features::check::check(self, RepairMode::All)?;
            *self.open_repairs.lock().unwrap_or_else(|e| e.into_inner()) = report.messages;
            let mut m = self.lock();
            let v = m.h().incompatible & !INCOMPAT_DIRTY;
            m.write_incompatible(v)?;
        }
        Ok(())
    }

    /// A read-only view of the disk as it was when snapshot `id_or_name` was taken
    /// (matched against ids first, then names, as qemu's `snapshot.name`/`-l`).
    /// It shares this image's backing device.
    pub fn open_snapshot(&self, id_or_name: &str) -> Result<Arc<dyn BlockDevice>> {
        let by_id = self
            .lock()
            .snapshots()
            .iter()
            .any(|s| s.info.id == id_or_name);
        let dev = if by_id {
            self.snapshot_view(Some(id_or_name), None)?
        } else {
            self.snapshot_view(None, Some(id_or_name))?
        };
        Ok(Arc::new(dev))
    }

    fn snapshot_view(&self, id: Option<&str>, name: Option<&str>) -> Result<Qcow2Device> {
        let m = self.lock();
        let snap = m
            .snapshots()
            .iter()
            .find(|s| id.is_none_or(|i| s.info.id == i) && name.is_none_or(|n| s.info.name == n))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Can't find snapshot '{}'",
                    name.or(id).unwrap_or_default()
                ))
            })?
            .clone();
        snap.check_l1(m.cs())?;
        let mut view = Meta::new(
            m.file().clone(),
            m.data().cloned(),
            m.h().clone(),
            m.limits(),
        );
        view.set_size(snap.disk_size.unwrap_or(m.h().size));
        view.share_reftable(&m);
        // The view's clusters are freed by operations on this image.
        view.share_epoch(&m);
        drop(m);
        if view.h().l1_entries_for(view.size()) > u64::from(snap.l1_size) {
            return Err(Error::corrupt(
                "qcow2",
                "Snapshot L1 table too small",
                snap.l1_offset,
            ));
        }
        view.load_l1(
            "Snapshot L1 table offset invalid",
            snap.l1_offset,
            u64::from(snap.l1_size),
        )?;
        Ok(Qcow2Device {
            size: AtomicU64::new(view.size()),
            epoch: self.epoch.clone(),
            meta: crossbeam_utils::sync::ShardedLock::new(view),
            file: self.file.clone(),
            data: self.data.clone(),
            backing: RwLock::new(self.backing()),
            backing_epoch: diskimg_blockio::BackingEpoch::new(self.backing().is_some()),
            read_only: true,
            bitmaps: Vec::new(),
            tracked: Mutex::new(Vec::new()),
            closed: diskimg_blockio::Closed::new(),
            open_repairs: Mutex::new(Vec::new()),
            snapshot_view: true,
            crypt: self.crypt.clone(),
            prealloc_map: std::sync::OnceLock::new(),
            behind: crate::behind::Behind::default(),
        })
    }
}

/// The external data file of the image with header `h`: the one the open options name
/// ([`Qcow2OpenOptions::data_file`], qemu's `data-file` child) or else the one the image
/// names; `None` for an image without one. qemu's refusals: an image with the data-file
/// feature but no name and no option, and the option for an image without the feature.
fn open_data_file(
    h: &Header,
    opts: &OpenOptions,
    q: &Qcow2OpenOptions,
    read_only: bool,
) -> Result<Option<Arc<dyn Storage>>> {
    let purpose = FilePurpose::DataFile;
    match (h.has_data_file(), &q.data_file, &h.ext.data_file) {
        (true, Some(given), _) => Ok(Some(opts.files.open_given(given, purpose, !read_only)?)),
        (true, None, Some(name)) => Ok(Some(opts.files.open(name, purpose, !read_only)?)),
        (true, None, None) => Err(Error::invalid("'data-file' is required for this image")),
        (false, Some(_), _) => Err(Error::invalid(
            "'data-file' can only be set for images with an external data file",
        )),
        // qemu's qcow2_do_open: the raw bit promises a data file that reads as the guest
        // does; without one, zero writes and discards would have nowhere to go. Not for
        // metadata only (`info`), which like qemu's BDRV_O_NO_IO skips data files.
        (false, None, _) if h.autoclear & AUTOCLEAR_DATA_RAW != 0 && !q.no_io => {
            Err(Error::invalid("data-file-raw requires a data file"))
        }
        (false, None, _) => Ok(None),
    }
}
