//! [`Qcow2Device`]: opening, reading, mapping and describing a qcow2 image.

use std::any::Any;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use diskimg_blockio::{
    Amend, BackingRef, BitmapInfo, Bitmaps, BlockDevice, ChainLink, CheckReport, CompressedUnits,
    DeviceInfo, Error, Extent, ExtentKind, FilePurpose, InfoValue, OpenOptions, Preallocation,
    RepairMode, Result, Snapshots, Storage, ZeroFlags, check_range, read_from_backing,
};

use crate::compress;
use crate::dirty::Tracked;
use crate::encryption::Encryption;
use crate::ext::{BitmapEntry, parse_bitmap_directory};
use crate::header::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_RAW, COMPAT_LAZY, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};
use crate::meta::{Cached, Meta, read_host};
use crate::open_options::Qcow2OpenOptions;
use crate::snapshot::read_snapshots;
use crate::table::{L2Cache, Sub};

/// An open qcow2 image (or a read-only view of one of its internal snapshots).
///
/// All I/O takes `&self`; metadata sits behind one mutex, guest data reads happen
/// outside it.
#[derive(Debug)]
pub struct Qcow2Device {
    pub(crate) meta: RwLock<Meta>,
    pub(crate) file: Arc<dyn Storage>,
    pub(crate) data: Option<Arc<dyn Storage>>,
    pub(crate) backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    pub(crate) read_only: bool,
    pub(crate) bitmaps: Vec<BitmapEntry>,
    /// The enabled persistent bitmaps tracking writes (read-write opens only).
    pub(crate) tracked: Mutex<Vec<Tracked>>,
    /// Set by [`Qcow2Device::close`]: writes are refused from then on (the bitmaps are
    /// stored and would not see them).
    pub(crate) closed: diskimg_blockio::Closed,
    /// What the repair of a dirty image at open printed (check messages).
    pub(crate) open_repairs: Mutex<Vec<String>>,
    /// The snapshot this view shows, if it is one.
    pub(crate) snapshot_view: bool,
    /// The data cipher of an encrypted image.
    pub(crate) crypt: Option<Arc<Encryption>>,
}

fn cache_tables(opts: &OpenOptions, cs: u64) -> usize {
    usize::try_from(opts.limits.max_cache_bytes / cs).unwrap_or(16)
}

impl Qcow2Device {
    /// Opens the image on `file` (see [`crate::DRIVER`] for the options honoured; the
    /// driver options are read by [`Qcow2OpenOptions::from_options`]).
    pub fn open(file: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        Self::open_with(file, opts, &Qcow2OpenOptions::from_options(opts))
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
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        let mut first = vec![0u8; usize::try_from(file_len.min(2 << 20)).unwrap_or(4096)];
        file.read_exact_at(&mut first, 0)?;
        let h = Header::parse(&first)?;
        let crypt = Encryption::open(file.as_ref(), &h, q, &opts.secrets)?.map(Arc::new);
        let read_only = opts.read_only || file.is_read_only();
        let checking = q.check;
        if h.incompatible & INCOMPAT_CORRUPT != 0 && !read_only && !checking {
            return Err(Error::invalid(
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        let bitmap_edit = q.bitmap_edit;
        let data = if h.has_data_file() {
            let name = h
                .ext
                .data_file
                .clone()
                .ok_or(Error::invalid("'data-file' is required for this image"))?;
            Some(opts.files.open(&name, FilePurpose::DataFile, !read_only)?)
        } else {
            None
        };
        let limits = opts.limits;
        let cs = h.cluster_size();
        let mut meta = Meta {
            file: file.clone(),
            data: data.clone(),
            l1: Vec::new(),
            l1_offset: h.l1_table_offset,
            size: h.size,
            l2: L2Cache::new(cache_tables(opts, cs)),
            reftable: Vec::new(),
            rb: Default::default(),
            limits,
            free_hint: 1,
            alloc_floor: 0,
            free_byte: 0,
            deferred: Vec::new(),
            deferred_unref: Vec::new(),
            deferred_flush: false,
            meta_clusters: Default::default(),
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            reserve: Default::default(),
            h,
        };
        meta.l1 = meta.read_table(
            "Active L1 table offset invalid",
            meta.h.l1_table_offset,
            u64::from(meta.h.l1_size),
        )?;
        meta.reftable = meta.read_table(
            "Reference count table offset invalid",
            meta.h.refcount_table_offset,
            u64::from(meta.h.refcount_table_clusters) * cs / 8,
        )?;
        let (snapshots, snapshot_table_len) = read_snapshots(file.as_ref(), &meta.h, &limits)?;
        if !read_only {
            meta.collect_meta();
            meta.note_meta(meta.h.snapshots_offset, snapshot_table_len);
            for s in &snapshots {
                meta.note_meta(s.l1_offset, u64::from(s.l1_size) * 8);
            }
        }
        meta.snapshots = snapshots;
        meta.snapshot_table_len = snapshot_table_len;
        let bitmaps = match meta.h.ext.bitmaps {
            Some(b) if meta.h.autoclear & AUTOCLEAR_BITMAPS != 0 => {
                if b.directory_offset % cs != 0 || b.directory_size > 64 << 20 {
                    return Err(Error::corrupt("qcow2", "invalid bitmap directory", 0));
                }
                let mut buf = limits.alloc("bitmap directory", b.directory_size)?;
                read_host(file.as_ref(), &mut buf, b.directory_offset)?;
                parse_bitmap_directory(&buf, b.nb_bitmaps)?
            }
            _ => Vec::new(),
        };
        let mut dev = Qcow2Device {
            meta: RwLock::new(meta),
            file,
            data,
            backing: RwLock::new(None),
            read_only,
            bitmaps,
            tracked: Mutex::new(Vec::new()),
            closed: diskimg_blockio::Closed::new(),
            open_repairs: Mutex::new(Vec::new()),
            snapshot_view: false,
            crypt,
        };
        if !read_only && checking {
            // A repair open (BDRV_O_CHECK) still drops the autoclear bits we cannot
            // keep, as qemu's; the dirty-image repair is the check's own business.
            dev.clear_unknown_autoclear()?;
        }
        if !read_only && !checking {
            dev.open_rw_fixups()?;
            let view = q.snapshot_view();
            if !bitmap_edit && !view && !dev.bitmaps.is_empty() {
                let tracked = crate::dirty::load(&mut dev.lock())?;
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
        let autoclear = m.h.autoclear;
        let keep = autoclear & (AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_RAW);
        if keep != autoclear {
            m.h.autoclear = keep;
            self.file.write_all_at(&keep.to_be_bytes(), 88)?;
            self.file.flush()?;
        }
        Ok(())
    }

    /// Clears autoclear bits we cannot maintain and repairs a dirty (lazy refcounts)
    /// image, as qemu does on a read-write open.
    fn open_rw_fixups(&self) -> Result<()> {
        let (dirty, autoclear) = {
            let m = self.lock();
            (m.h.incompatible & INCOMPAT_DIRTY != 0, m.h.autoclear)
        };
        self.clear_unknown_autoclear()?;
        // A program lacking bitmap support cleared the autoclear bit: the bitmaps are
        // inconsistent and qemu drops the extension (their clusters leak).
        if autoclear & AUTOCLEAR_BITMAPS == 0 {
            let mut m = self.lock();
            if m.h.ext.bitmaps.is_some() {
                let mut h = m.h.clone();
                h.ext.bitmaps = None;
                crate::maint::write_header(&mut m, &mut h)?;
            }
        }
        if dirty {
            let report = crate::check::check(self, RepairMode::All)?;
            *self.open_repairs.lock().unwrap_or_else(|e| e.into_inner()) = report.messages;
            let mut m = self.lock();
            m.h.incompatible &= !INCOMPAT_DIRTY;
            let v = m.h.incompatible;
            self.file.flush()?;
            self.file.write_all_at(&v.to_be_bytes(), 72)?;
            self.file.flush()?;
        }
        Ok(())
    }

    /// The metadata, exclusively (writers, and readers whose L2 table is not cached).
    pub(crate) fn lock(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata, shared: reads of cached mappings do not exclude each other.
    pub(crate) fn shared(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Meta::resolve`] under the shared lock when the L2 tables are cached, under the
    /// exclusive one otherwise.
    fn resolve(&self, guest: u64, max: u64) -> Result<(Sub, u64)> {
        if let Cached::Hit((sub, n, _)) = self.shared().resolve_cached(guest, max)? {
            return Ok((sub, n));
        }
        self.lock().resolve(guest, max)
    }

    pub(crate) fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The internal snapshots (id, name, sizes, dates) as `qemu-img snapshot -l` lists them.
    pub fn snapshots(&self) -> Vec<diskimg_blockio::SnapshotInfo> {
        self.lock()
            .snapshots
            .iter()
            .map(|s| s.info.clone())
            .collect()
    }

    /// The persistent dirty bitmaps the image holds (qcow2 spec "Bitmaps extension"),
    /// as `qemu-img info` lists them.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.bitmaps
            .iter()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: b.granularity,
                in_use: b.in_use,
                auto: b.auto,
            })
            .collect()
    }

    /// A read-only view of the disk as it was when snapshot `id_or_name` was taken
    /// (matched against ids first, then names, as qemu's `snapshot.name`/`-l`).
    /// It shares this image's backing device.
    pub fn open_snapshot(&self, id_or_name: &str) -> Result<Arc<dyn BlockDevice>> {
        let by_id = self
            .lock()
            .snapshots
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
            .snapshots
            .iter()
            .find(|s| id.is_none_or(|i| s.info.id == i) && name.is_none_or(|n| s.info.name == n))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Can't find snapshot '{}'",
                    name.or(id).unwrap_or_default()
                ))
            })?
            .clone();
        let cs = m.cs();
        let mut view = Meta {
            file: m.file.clone(),
            data: m.data.clone(),
            h: m.h.clone(),
            l1: Vec::new(),
            l1_offset: snap.l1_offset,
            size: snap.disk_size.unwrap_or(m.h.size),
            l2: L2Cache::new(usize::try_from(m.limits.max_cache_bytes / cs).unwrap_or(16)),
            reftable: m.reftable.clone(),
            rb: Default::default(),
            limits: m.limits,
            free_hint: 1,
            alloc_floor: 0,
            free_byte: 0,
            deferred: Vec::new(),
            deferred_unref: Vec::new(),
            deferred_flush: false,
            meta_clusters: Default::default(),
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            reserve: Default::default(),
        };
        drop(m);
        if view.h.l1_entries_for(view.size) > u64::from(snap.l1_size) {
            return Err(Error::corrupt(
                "qcow2",
                "Snapshot L1 table too small",
                snap.l1_offset,
            ));
        }
        view.l1 = view.read_table(
            "Snapshot L1 table offset invalid",
            snap.l1_offset,
            u64::from(snap.l1_size),
        )?;
        Ok(Qcow2Device {
            meta: RwLock::new(view),
            file: self.file.clone(),
            data: self.data.clone(),
            backing: RwLock::new(self.backing()),
            read_only: true,
            bitmaps: Vec::new(),
            tracked: Mutex::new(Vec::new()),
            closed: diskimg_blockio::Closed::new(),
            open_repairs: Mutex::new(Vec::new()),
            snapshot_view: true,
            crypt: self.crypt.clone(),
        })
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            self.closed.check()
        }
    }

    /// Reads one resolved run into `dst` (no lock held by the caller).
    fn read_run(&self, sub: Sub, dst: &mut [u8], guest: u64) -> Result<()> {
        match sub {
            Sub::Data(h) => {
                let s = self.data.as_ref().unwrap_or(&self.file);
                match &self.crypt {
                    Some(c) => c.read(s.as_ref(), dst, h, guest),
                    None => read_host(s.as_ref(), dst, h),
                }
            }
            Sub::Zero | Sub::ZeroAlloc(_) => {
                dst.fill(0);
                Ok(())
            }
            Sub::Unalloc => read_from_backing(self.backing().as_deref(), dst, guest),
            Sub::Compressed(h, clen) => {
                let (cs, ty) = {
                    let m = self.shared();
                    (m.cs(), m.h.compression_type)
                };
                if guest.is_multiple_of(cs) && dst.len() as u64 == cs {
                    // A whole cluster (convert reads whole chunks): inflate in place.
                    return self.read_compressed(ty, h, clen, dst);
                }
                let mut cluster = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                self.read_compressed(ty, h, clen, &mut cluster)?;
                let start = usize::try_from(guest % cs).unwrap_or(0);
                let src = cluster.get(start..start + dst.len()).ok_or(Error::corrupt(
                    "qcow2",
                    "compressed read",
                    h,
                ))?;
                dst.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Inflates the compressed cluster at host `h` (at most `clen` bytes) into `out`.
    pub(crate) fn read_compressed(&self, ty: u8, h: u64, clen: u64, out: &mut [u8]) -> Result<()> {
        // `clen` counts whole sectors and may reach past the end of the file (the last
        // cluster): the length is only asked for when the whole read fails.
        let mut input = vec![0u8; usize::try_from(clen).unwrap_or(0)];
        if self.file.read_exact_at(&mut input, h).is_err() {
            let len = self.file.len()?;
            let n = clen.min(len.saturating_sub(h));
            if n == 0 {
                return Err(Error::corrupt(
                    "qcow2",
                    "compressed cluster beyond the end of the file",
                    h,
                ));
            }
            input.truncate(usize::try_from(n).unwrap_or(0));
            self.file.read_exact_at(&mut input, h)?;
        }
        compress::decompress(ty, &input, out, h)
    }

    /// Reads guest bytes with the metadata lock held (used by copy-on-write).
    pub(crate) fn read_locked(&self, m: &mut Meta, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let guest = off + done as u64;
            let (sub, n) = m.resolve(guest, (buf.len() - done) as u64)?;
            let n = usize::try_from(n).unwrap_or(0).max(1).min(buf.len() - done);
            let dst = buf
                .get_mut(done..done + n)
                .ok_or(Error::invalid("read range"))?;
            match sub {
                Sub::Compressed(h, clen) => {
                    let cs = m.cs();
                    let mut cluster = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                    self.read_compressed(m.h.compression_type, h, clen, &mut cluster)?;
                    let start = usize::try_from(guest % cs).unwrap_or(0);
                    dst.copy_from_slice(cluster.get(start..start + n).ok_or(Error::corrupt(
                        "qcow2",
                        "compressed read",
                        h,
                    ))?);
                }
                other => self.read_run(other, dst, guest)?,
            }
            done += n;
        }
        Ok(())
    }

    fn format_specific(&self, m: &Meta) -> Vec<(String, InfoValue)> {
        let h = &m.h;
        let mut d: Vec<(String, InfoValue)> = Vec::new();
        let s = |v: &str| InfoValue::Str(v.to_string());
        let v3 = h.version >= 3;
        d.push(("compat".into(), s(if v3 { "1.1" } else { "0.10" })));
        d.push((
            "compression-type".into(),
            s(if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            }),
        ));
        if v3 {
            d.push((
                "lazy-refcounts".into(),
                InfoValue::Bool(h.compatible & COMPAT_LAZY != 0),
            ));
        }
        if !self.bitmaps.is_empty() {
            let list = self
                .bitmaps
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.in_use {
                        flags.push(s("in-use"));
                    }
                    if b.auto {
                        flags.push(s("auto"));
                    }
                    InfoValue::Map(vec![
                        ("flags".into(), InfoValue::List(flags)),
                        ("name".into(), s(&b.name)),
                        (
                            "granularity".into(),
                            InfoValue::Int(i64::try_from(b.granularity).unwrap_or(i64::MAX)),
                        ),
                    ])
                })
                .collect();
            d.push(("bitmaps".into(), InfoValue::List(list)));
        }
        d.push((
            "refcount-bits".into(),
            InfoValue::Int(i64::from(h.refcount_bits())),
        ));
        if let Some(c) = &self.crypt {
            d.push(("encrypt".into(), c.info()));
        }
        if v3 {
            if h.has_data_file() {
                if let Some(name) = &h.ext.data_file {
                    d.push(("data-file".into(), s(name)));
                }
                d.push((
                    "data-file-raw".into(),
                    InfoValue::Bool(h.autoclear & AUTOCLEAR_DATA_RAW != 0),
                ));
            }
            d.push((
                "corrupt".into(),
                InfoValue::Bool(h.incompatible & INCOMPAT_CORRUPT != 0),
            ));
            d.push(("extended-l2".into(), InfoValue::Bool(h.extended_l2())));
        }
        d
    }
}

impl Drop for Qcow2Device {
    /// Writes deferred metadata and the persistent dirty bitmaps, as closing an image in
    /// qemu does (errors are ignored: call [`Qcow2Device::close`] to see them).
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl BlockDevice for Qcow2Device {
    fn info(&self) -> DeviceInfo {
        let m = self.lock();
        let mut info = DeviceInfo::new("qcow2", m.size);
        info.cluster_size = Some(m.cs());
        info.read_only = self.read_only;
        info.dirty = m.h.incompatible & INCOMPAT_DIRTY != 0;
        info.encrypted = m.h.crypt_method != 0;
        info.backing =
            m.h.backing_file
                .as_ref()
                .map(|b| BackingRef::new(b.clone(), m.h.ext.backing_format.clone()));
        info.format_specific = Some(("qcow2", self.format_specific(&m)));
        info.snapshots = m.snapshots.iter().map(|s| s.info.clone()).collect();
        info
    }

    fn virtual_size(&self) -> u64 {
        self.shared().size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let (sub, n) = self.resolve(guest, (buf.len() - done) as u64)?;
            let n = usize::try_from(n).unwrap_or(0).max(1).min(buf.len() - done);
            let dst = buf
                .get_mut(done..done + n)
                .ok_or(Error::invalid("read range"))?;
            self.read_run(sub, dst, guest)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        self.mark_dirty(offset, buf.len() as u64);
        crate::write::write(self, buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        self.mark_dirty(offset, len);
        crate::write::write_zeroes(self, offset, len, flags.may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        self.mark_dirty(offset, len);
        crate::write::discard(self, offset, len)
    }

    /// [`Qcow2Device::close`].
    fn close(&self) -> Result<()> {
        Qcow2Device::close(self)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // The storage flushes run without the metadata lock (readers and writers go on).
        let generation = self.lock().guest_flush()?;
        if let Some(d) = &self.data {
            d.flush()?;
        }
        self.file.flush()?;
        self.lock().reserve_flushed(generation);
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.virtual_size())?;
        if len == 0 {
            return Err(Error::invalid("map of an empty range"));
        }
        let (sub, n) = self.resolve(offset, len)?;
        // As qemu: no host offsets for encrypted data (they would expose ciphertext).
        let clear = self.crypt.is_none();
        let kind = match sub {
            Sub::Data(h) => ExtentKind::Data {
                offset: Some(h).filter(|_| clear),
            },
            Sub::ZeroAlloc(h) => ExtentKind::Zero {
                offset: Some(h).filter(|_| clear),
            },
            Sub::Zero => ExtentKind::Zero { offset: None },
            Sub::Unalloc => ExtentKind::Unallocated,
            Sub::Compressed(..) => ExtentKind::Compressed,
        };
        Ok(Extent {
            offset,
            len: n.max(1),
            kind,
        })
    }

    /// The external data file, which every host offset of `map` refers to.
    fn host_files(&self) -> Vec<String> {
        if self.data.is_none() {
            return Vec::new();
        }
        self.lock().h.ext.data_file.clone().into_iter().collect()
    }

    fn map_file(&self, _offset: u64) -> usize {
        usize::from(self.data.is_some())
    }

    fn compressed_write_granularity(&self) -> Option<u64> {
        (!self.read_only && self.data.is_none() && self.crypt.is_none()).then(|| self.lock().cs())
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.virtual_size())?;
        self.mark_dirty(offset, buf.len() as u64);
        crate::compressed_write::write_compressed(self, buf, offset)
    }

    fn compress_units(&self, buf: &[u8], offset: u64) -> Result<CompressedUnits> {
        self.writable()?;
        crate::compressed_write::compress_units(self, buf, offset)
    }

    fn write_compressed_units(&self, units: CompressedUnits) -> Result<()> {
        self.writable()?;
        check_range(units.offset, units.len, self.virtual_size())?;
        self.mark_dirty(units.offset, units.len);
        crate::compressed_write::write_units(self, units)
    }

    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) -> Result<()> {
        *self.backing.write().unwrap_or_else(|e| e.into_inner()) = backing;
        Ok(())
    }

    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing()
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        self.writable()?;
        crate::resize::resize(self, new_size, prealloc, shrink, true)
    }

    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        if self.snapshot_view {
            return Err(Error::unsupported("qcow2", "checking a snapshot view"));
        }
        if repair != RepairMode::None {
            self.writable()?;
        }
        crate::check::check(self, repair)
    }

    /// The image file, or the external data file; `None` for encrypted images (their
    /// host bytes are ciphertext).
    fn data_storage(&self) -> Option<Arc<dyn Storage>> {
        if self.crypt.is_some() {
            return None;
        }
        Some(self.data.clone().unwrap_or_else(|| self.file.clone()))
    }

    /// Whole clusters are copied into their host clusters with
    /// [`copy_range`](diskimg_blockio::copy_range); see `offload.rs`.
    fn write_from(&self, offset: u64, len: u64, src: &dyn Storage, src_offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.virtual_size())?;
        self.mark_dirty(offset, len);
        crate::offload::write_from(self, offset, len, src, src_offset)
    }

    fn repaired_at_open(&self) -> Vec<String> {
        self.open_repairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn as_snapshots(&self) -> Option<&dyn Snapshots> {
        Some(self)
    }

    /// Version 3 images only (version 2 cannot hold bitmaps).
    fn as_bitmaps(&self) -> Option<&dyn Bitmaps> {
        (self.lock().h.version >= 3).then_some(self as &dyn Bitmaps)
    }

    fn as_amend(&self) -> Option<&dyn Amend> {
        Some(self)
    }

    fn as_chain_link(&self) -> Option<&dyn ChainLink> {
        Some(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
