//! [`Qcow2Device`]: the state of an open qcow2 image (or of a read-only view of one of
//! its internal snapshots) and its small accessors. Opening is `open.rs`, the read path
//! `read.rs`, the write path `write.rs`, the [`BlockDevice`] methods `blockdev.rs`; the
//! features (`features/`) and the metadata engine (`engine/`) do the rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

use diskimg_blockio::{BitmapInfo, BlockDevice, Error, InfoValue, Result, Storage};

use crate::disk::bitmap_dir::BitmapEntry;
use crate::disk::header::{AUTOCLEAR_DATA_RAW, COMPAT_LAZY, INCOMPAT_CORRUPT};
use crate::encryption::Encryption;
use crate::engine::meta::Meta;
use crate::tracked::Tracked;

/// The metadata held exclusively ([`Qcow2Device::lock`]).
pub(crate) type MetaGuard<'a> = ShardedLockWriteGuard<'a, Meta>;

/// An open qcow2 image (or a read-only view of one of its internal snapshots).
///
/// All I/O takes `&self`; metadata sits behind one reader-writer lock, guest data reads
/// happen outside it.
#[derive(Debug)]
pub struct Qcow2Device {
    /// The metadata. A sharded lock: a reader takes the shared lock of its own thread's
    /// shard only, so threads reading cached mappings at once write no common cache line
    /// (one `RwLock` had every read of every thread write its state twice); a writer
    /// takes every shard.
    pub(crate) meta: ShardedLock<Meta>,
    /// [`Meta::size`], readable without the lock: a read asks for the size once per
    /// request, and taking the shared lock for it would write the lock's cache line once
    /// more per read (threads reading one device bounce it between cores). Stored under
    /// the exclusive lock wherever `Meta::size` changes ([`Qcow2Device::set_size`]).
    pub(crate) size: AtomicU64,
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
    /// Whether the image looked metadata-preallocated at its first `map`
    /// (`features::prealloc_map`).
    pub(crate) prealloc_map: std::sync::OnceLock<bool>,
    /// Write-behind of small writes into fresh clusters (`behind.rs`).
    pub(crate) behind: crate::behind::Behind,
    /// The host epoch, shared with the metadata (`engine::epoch`), read without the lock.
    pub(crate) epoch: crate::engine::epoch::HostEpoch,
    /// The backing device's part of the host epoch.
    pub(crate) backing_epoch: diskimg_blockio::BackingEpoch,
}

impl Qcow2Device {
    /// The metadata, exclusively (writers, and readers whose L2 table is not cached).
    pub(crate) fn lock(&self) -> MetaGuard<'_> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata, shared: reads of cached mappings do not exclude each other.
    pub(crate) fn shared(&self) -> ShardedLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest size, without taking the metadata lock.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Sets the guest size in `m` (held exclusively) and its lock-free copy.
    pub(crate) fn set_size(&self, m: &mut Meta, size: u64) {
        m.set_size(size);
        self.size.store(size, Ordering::Release);
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
            .snapshots()
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

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            self.closed.check()
        }
    }

    pub(crate) fn format_specific(&self, m: &Meta) -> Vec<(String, InfoValue)> {
        let h = m.h();
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
