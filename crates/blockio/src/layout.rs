//! The one guest-I/O skeleton: formats answer a mapping lookup ([`Layout`]), and the code
//! here does the range check, the splitting, the reads from host, zeroes and backing, and
//! `map` ([`read_via`], [`map_via`], [`for_each_run`]). Read and map agree by
//! construction because both walk the same lookups.
//!
//! A format implements [`Layout`] on a small per-request *view* it builds under its own
//! lock and passes to [`read_via`] / [`map_via`]; its write and allocation paths stay its
//! own ([`guard_write`] is their shared read-only and range check). Vectored and async
//! engines plug into [`for_each_run`] (see docs/DESIGN.md, "The guest-I/O skeleton").
//!
//! ```
//! use diskimg_blockio::{BlockDevice, HostRun, Layout, Mapping, MemStorage, PastEof, Result,
//!                       Storage, map_via, read_via};
//!
//! /// Guest bytes 0..4096 live at host 4096.., the rest of the 8 KiB disk is zeroes.
//! struct View<'a>(&'a MemStorage);
//!
//! impl Layout for View<'_> {
//!     fn size(&self) -> u64 { 8192 }
//!     fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
//!         Ok(if offset < 4096 {
//!             (Mapping::Host(HostRun::new(self.0, 4096 + offset)), max.min(4096 - offset))
//!         } else {
//!             (Mapping::Zero { host: None }, max)
//!         })
//!     }
//! }
//!
//! let host = MemStorage::from_vec(vec![7; 8192]);
//! let mut buf = [1u8; 8];
//! read_via(&View(&host), &mut buf, 4092)?;
//! assert_eq!(buf, [7, 7, 7, 7, 0, 0, 0, 0]);
//! assert_eq!(map_via(&View(&host), 0, 8192)?.len, 4096);
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

use std::io::IoSliceMut;
use std::sync::Arc;

use crate::device::{
    BlockDevice, Extent, ExtentKind, Holes, check_range, map_host_run, read_each, read_from_backing,
};
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::vectored::total_len;

/// What a read of host bytes past the end of the host file means ([`HostRun::past_eof`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PastEof {
    /// The storage's own error (the default).
    #[default]
    Fail,
    /// The missing bytes read as zeroes, as qemu's file layer returns them (raw images
    /// whose size is not a sector multiple, VDI blocks cut by a crash, VMDK flat extents).
    Zero,
    /// The image is corrupt: a table points past the end of the file.
    Corrupt {
        /// Format name for the error.
        format: &'static str,
        /// What is wrong ("BAT entry points after end of file").
        what: &'static str,
        /// File offset of the table that points there.
        offset: u64,
    },
}

/// Guest bytes stored plainly in one host storage.
#[derive(Clone, Copy, Debug)]
pub struct HostRun<'a> {
    /// The storage holding them (the image file, a data file, an extent).
    pub storage: &'a dyn Storage,
    /// Host offset of the run's first byte.
    pub offset: u64,
    /// What reading past the end of `storage` means.
    pub past_eof: PastEof,
    /// How `map` reports host holes under the run ([`Holes`]): not at all (the run is
    /// [`ExtentKind::Data`] whatever the host file holds, the default), as
    /// [`ExtentKind::Zero`] (raw files) or as [`ExtentKind::DataZero`] (fixed VHDs,
    /// static VDIs, VMDK flat extents, metadata-preallocated qcow2), as qemu's block
    /// layer reports them.
    pub holes: Holes,
}

impl<'a> HostRun<'a> {
    /// A run at `offset` of `storage`; reading past its end fails, holes map as data.
    pub fn new(storage: &'a dyn Storage, offset: u64) -> Self {
        Self {
            storage,
            offset,
            past_eof: PastEof::Fail,
            holes: Holes::Ignored,
        }
    }

    /// Sets [`HostRun::past_eof`].
    pub fn past_eof(mut self, past_eof: PastEof) -> Self {
        self.past_eof = past_eof;
        self
    }

    /// Sets [`HostRun::holes`].
    pub fn holes(mut self, holes: Holes) -> Self {
        self.holes = holes;
        self
    }

    /// Reads `buf` from the run's start, applying [`HostRun::past_eof`].
    pub fn read(&self, buf: &mut [u8]) -> Result<()> {
        let err = match self.storage.read_exact_at(buf, self.offset) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if self.past_eof == PastEof::Fail {
            return Err(err);
        }
        let len = self.storage.len()?;
        let end = self.offset.saturating_add(buf.len() as u64);
        if end <= len {
            return Err(err);
        }
        if let PastEof::Corrupt {
            format,
            what,
            offset,
        } = self.past_eof
        {
            return Err(Error::corrupt(format, what, offset));
        }
        let avail = usize::try_from(len.saturating_sub(self.offset)).unwrap_or(buf.len());
        let (head, tail) = buf.split_at_mut(avail.min(buf.len()));
        if !head.is_empty() {
            self.storage.read_exact_at(head, self.offset)?;
        }
        tail.fill(0);
        Ok(())
    }
}

/// Where one run of guest bytes lives in one image layer ([`Layout::lookup`]).
#[derive(Clone, Copy, Debug)]
pub enum Mapping<'a> {
    /// Plain guest bytes in a host storage.
    Host(HostRun<'a>),
    /// Zeroes, decided by this layer (a zero flag, an unallocated block of a format
    /// without backing files); `host` is the host space behind them, if any.
    Zero {
        /// Host offset of preallocated space that reads as zeroes, when there is one.
        host: Option<u64>,
    },
    /// This layer holds nothing here: reads come from [`Layout::backing`], or are
    /// zeroes without one; `host` is space the layer reserved for the range without
    /// using it, if any (what `map` reports, [`ExtentKind::Unallocated`]).
    Unallocated {
        /// Host offset of the reserved space.
        host: Option<u64>,
    },
    /// Bytes the format decodes itself ([`Layout::read_special`]): compressed or
    /// encrypted data. `kind` is what `map` reports; `token` is handed back to
    /// `read_special` (a table entry or host offset, so it need not look up again).
    Special {
        /// What [`map_via`] reports for the run.
        kind: ExtentKind,
        /// The format's own note for [`Layout::read_special`].
        token: u64,
    },
}

/// One format's answer to "where do the guest bytes at this offset live?", implemented
/// on a per-request view the format builds under its own lock.
///
/// Implementors must return from [`Layout::lookup`] a run of at least one byte and at
/// most `max` bytes, all of one [`Mapping`], never past [`Layout::size`]; and fail (not
/// panic) on tables that point nowhere.
pub trait Layout {
    /// The virtual size the range checks use.
    fn size(&self) -> u64;

    /// The mapping of the first run at guest `offset` and its length (`1..=max`).
    /// `offset` is inside the disk and `max` non-zero.
    fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)>;

    /// Reads a [`Mapping::Special`] run (or part of it) at guest `offset` into `buf`.
    /// The default refuses: formats that return special runs override it.
    fn read_special(&self, _token: u64, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::internal("this layout has no special runs"))
    }

    /// The device [`Mapping::Unallocated`] runs read from (`None`: zeroes). Asked once
    /// per unallocated run.
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
}

/// Calls `f(guest offset, length, mapping)` for each run of `offset..offset+len`, in
/// guest order, after checking the range: the one walk every read, map and I/O engine
/// shares.
pub fn for_each_run<L: Layout + ?Sized>(
    layout: &L,
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, u64, Mapping<'_>) -> Result<()>,
) -> Result<()> {
    check_range(offset, len, layout.size())?;
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let (mapping, n) = layout.lookup(pos, end - pos)?;
        if n == 0 || n > end - pos {
            return Err(Error::internal(
                "layout lookup returned a run of a bad length",
            ));
        }
        f(pos, n, mapping)?;
        pos += n;
    }
    Ok(())
}

/// The callback of [`BlockDevice::walk_runs`]: `f(layout, guest offset, length, mapping)`
/// for each run, the layout being the one [`read_run`] needs for the run.
pub type RunFn<'f> = dyn for<'a> FnMut(&'a dyn Layout, u64, u64, Mapping<'a>) -> Result<()> + 'f;

/// [`for_each_run`] for [`BlockDevice::walk_runs`]: what a format on this skeleton
/// answers there (`walk(&self.view(), offset, len, f)`), always `Ok(true)` on success.
pub fn walk<L: Layout>(layout: &L, offset: u64, len: u64, f: &mut RunFn<'_>) -> Result<bool> {
    for_each_run(layout, offset, len, |pos, n, m| f(layout, pos, n, m)).map(|()| true)
}

/// `mapping` of a run, advanced by `by` bytes into the run (for reading part of it).
pub fn advance_mapping(mapping: Mapping<'_>, by: u64) -> Result<Mapping<'_>> {
    Ok(match mapping {
        Mapping::Host(mut run) => {
            run.offset = run
                .offset
                .checked_add(by)
                .ok_or(Error::invalid("host offset overflow"))?;
            Mapping::Host(run)
        }
        m => m,
    })
}

/// [`BlockDevice::read_vectored_at`]'s default: through the device's layout walk
/// ([`BlockDevice::walk_runs`]) when it has one — each host run of the request is one
/// [`Storage::read_vectored_exact_at`] (one `preadv(2)` for files) over the parts of the
/// buffers it fills (again per part when that fails on a run that may reach past the
/// file's end), zero runs are filled, other runs read per buffer part — else one
/// `read_at` per buffer ([`read_each`](crate::vectored::read_each)).
pub fn read_walked<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> Result<()> {
    let len = total_len(bufs.iter().map(|b| b.len()), offset)?;
    check_range(offset, len, dev.virtual_size())?;
    let mut cur = Cursor {
        bufs: &mut *bufs,
        i: 0,
        skip: 0,
    };
    let walked = dev.walk_runs(offset, len, &mut |layout, pos, n, mapping| {
        let mut parts = cur.next(n);
        if let Mapping::Host(run) = mapping {
            let mut iov: Vec<IoSliceMut<'_>> =
                parts.iter_mut().map(|p| IoSliceMut::new(p)).collect();
            let whole = run.storage.read_vectored_exact_at(&mut iov, run.offset);
            // A run cut short by the file's end reads per part below, where
            // `HostRun::read` treats the missing bytes as its `past_eof` says.
            if whole.is_ok() || run.past_eof == PastEof::Fail {
                return whole;
            }
        }
        let mut at = 0u64;
        for p in parts {
            let m = advance_mapping(mapping, at)?;
            read_run(layout, pos + at, m, p)?;
            at += p.len() as u64;
        }
        Ok(())
    })?;
    if walked {
        return Ok(());
    }
    read_each(dev, bufs, offset)
}

/// A position in a buffer list, handing out the parts of the next `n` bytes.
struct Cursor<'b, 'c> {
    bufs: &'b mut [IoSliceMut<'c>],
    i: usize,
    skip: usize,
}

impl Cursor<'_, '_> {
    fn next(&mut self, n: u64) -> Vec<&mut [u8]> {
        let mut left = usize::try_from(n).unwrap_or(usize::MAX);
        let (mut i, mut skip) = (self.i, self.skip);
        let mut out = Vec::new();
        for b in self.bufs.iter_mut().skip(self.i) {
            if left == 0 {
                break;
            }
            let avail = b.len().saturating_sub(skip);
            let take = avail.min(left);
            out.push(b.get_mut(skip..skip + take).unwrap_or_default());
            left -= take;
            if take == avail {
                (i, skip) = (i + 1, 0);
            } else {
                skip += take;
            }
        }
        (self.i, self.skip) = (i, skip);
        out
    }
}

/// Fills `buf` with the guest bytes at `offset`: host runs from their storage, zero runs
/// with zeroes, unallocated runs from the backing device, special runs through the
/// format.
pub fn read_via<L: Layout + ?Sized>(layout: &L, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0usize;
    for_each_run(layout, offset, buf.len() as u64, |pos, n, mapping| {
        let n = usize::try_from(n).map_err(|_| Error::internal("read run too long"))?;
        let chunk = buf
            .get_mut(done..done.saturating_add(n))
            .ok_or(Error::internal("read run outside the buffer"))?;
        done += n;
        read_run(layout, pos, mapping, chunk)
    })
}

/// Reads one run found by [`for_each_run`] into `chunk` (its length).
pub fn read_run<L: Layout + ?Sized>(
    layout: &L,
    offset: u64,
    mapping: Mapping<'_>,
    chunk: &mut [u8],
) -> Result<()> {
    match mapping {
        Mapping::Host(run) => run.read(chunk),
        Mapping::Zero { .. } => {
            chunk.fill(0);
            Ok(())
        }
        Mapping::Unallocated { .. } => {
            read_from_backing(layout.backing().as_deref(), chunk, offset)
        }
        Mapping::Special { token, .. } => layout.read_special(token, offset, chunk),
    }
}

/// At most this many lookups are merged into one extent by [`map_via`].
const MAX_MERGE: usize = 65536;

/// The extent of the one run [`Layout::lookup`] answers at `offset` (no longer than
/// `len`), without merging following runs as [`map_via`] does: for formats whose lookup
/// already returns the longest run it can and whose callers size their work by extent
/// (qcow2: `convert` reads a compressed extent's clusters together).
pub fn map_run<L: Layout + ?Sized>(layout: &L, offset: u64, len: u64) -> Result<Extent> {
    check_range(offset, len, layout.size())?;
    if len == 0 {
        return Err(Error::invalid("map of an empty range"));
    }
    Ok(extent_of(layout, offset, len)?.0)
}

/// The first extent at `offset` (no longer than `len`), from the same lookups
/// [`read_via`] uses; following runs of the same kind (contiguous on the host for data)
/// are merged.
pub fn map_via<L: Layout + ?Sized>(layout: &L, offset: u64, len: u64) -> Result<Extent> {
    check_range(offset, len, layout.size())?;
    if len == 0 {
        return Err(Error::invalid("map of an empty range"));
    }
    let end = offset + len;
    let (first, mut whole, storage) = extent_of(layout, offset, len)?;
    let mut n = first.len;
    for _ in 0..MAX_MERGE {
        // A run cut short (at a host hole) ends the extent without another lookup.
        if !whole || n >= len || first.kind_at_end(n).is_none() {
            break;
        }
        let (next, next_whole, next_storage) = extent_of(layout, offset + n, end - offset - n)?;
        if Some(next.kind) != first.kind_at_end(n) || next_storage != storage {
            break;
        }
        n += next.len;
        whole = next_whole;
    }
    Ok(Extent {
        offset,
        len: n,
        kind: first.kind,
    })
}

/// Which storage a host run is in (runs in different storages never merge).
type StorageId = Option<*const u8>;

/// The extent of the first run at `offset`, whether it covers the whole run (a host run
/// with holes is cut at the first change between data and hole), and its storage.
fn extent_of<L: Layout + ?Sized>(
    layout: &L,
    offset: u64,
    len: u64,
) -> Result<(Extent, bool, StorageId)> {
    let (mapping, n) = layout.lookup(offset, len)?;
    if n == 0 || n > len {
        return Err(Error::internal(
            "layout lookup returned a run of a bad length",
        ));
    }
    let kind = match mapping {
        Mapping::Host(run) if run.holes != Holes::Ignored => {
            let e = map_host_run(run.storage, offset, run.offset, n, run.holes)?;
            return Ok((e, e.len == n, storage_id(&mapping)));
        }
        Mapping::Host(run) => ExtentKind::Data {
            offset: Some(run.offset),
        },
        Mapping::Zero { host } => ExtentKind::Zero { offset: host },
        Mapping::Unallocated { host } => ExtentKind::Unallocated { offset: host },
        Mapping::Special { kind, .. } => kind,
    };
    Ok((
        Extent {
            offset,
            len: n,
            kind,
        },
        true,
        storage_id(&mapping),
    ))
}

fn storage_id(m: &Mapping<'_>) -> StorageId {
    match m {
        Mapping::Host(run) => Some(std::ptr::from_ref(run.storage).cast::<u8>()),
        _ => None,
    }
}

trait KindAtEnd {
    fn kind_at_end(&self, n: u64) -> Option<ExtentKind>;
}

impl KindAtEnd for Extent {
    /// The kind a following run must have to extend this extent to `n` bytes: the same,
    /// with host offsets advanced by `n` (`None` when host offsets overflow).
    fn kind_at_end(&self, n: u64) -> Option<ExtentKind> {
        let at = |o: Option<u64>| match o {
            None => Some(None),
            Some(h) => h.checked_add(n).map(Some),
        };
        Some(match self.kind {
            ExtentKind::Data { offset } => ExtentKind::Data {
                offset: at(offset)?,
            },
            ExtentKind::Zero { offset } => ExtentKind::Zero {
                offset: at(offset)?,
            },
            ExtentKind::DataZero { offset } => ExtentKind::DataZero {
                offset: offset.checked_add(n)?,
            },
            ExtentKind::Unallocated { offset } => ExtentKind::Unallocated {
                offset: at(offset)?,
            },
            ExtentKind::Compressed => ExtentKind::Compressed,
        })
    }
}

/// The shared check of every write path: [`Error::ReadOnly`] on a read-only device,
/// then [`Error::OutOfRange`] unless `offset..offset+len` lies within `size`.
pub fn guard_write(read_only: bool, offset: u64, len: u64, size: u64) -> Result<()> {
    if read_only {
        return Err(Error::ReadOnly);
    }
    check_range(offset, len, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// 4 blocks of 16 bytes: host data, zero, unallocated, special.
    struct Four<'a> {
        host: &'a MemStorage,
        backing: Option<Arc<dyn BlockDevice>>,
    }

    impl Layout for Four<'_> {
        fn size(&self) -> u64 {
            64
        }
        fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
            let n = max.min(16 - offset % 16);
            let m = match offset / 16 {
                0 => Mapping::Host(HostRun::new(self.host, offset)),
                1 => Mapping::Zero { host: None },
                2 => Mapping::Unallocated { host: None },
                _ => Mapping::Special {
                    kind: ExtentKind::Compressed,
                    token: 9,
                },
            };
            Ok((m, n))
        }
        fn read_special(&self, token: u64, _offset: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(u8::try_from(token).unwrap_or(0));
            Ok(())
        }
        fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
            self.backing.clone()
        }
    }

    #[test]
    fn reads_every_kind_and_maps_the_same_runs() {
        let host = MemStorage::from_vec(vec![5; 16]);
        let l = Four {
            host: &host,
            backing: None,
        };
        let mut buf = vec![1u8; 64];
        read_via(&l, &mut buf, 0).unwrap();
        assert_eq!(&buf[..16], &[5; 16]);
        assert_eq!(&buf[16..48], &[0; 32]);
        assert_eq!(&buf[48..], &[9; 16]);
        let kinds: Vec<_> = (0..4)
            .map(|i| map_via(&l, i * 16, 64 - i * 16).unwrap())
            .map(|e| (e.len, e.kind))
            .collect();
        assert_eq!(kinds[0], (16, ExtentKind::Data { offset: Some(0) }));
        assert_eq!(kinds[1], (16, ExtentKind::Zero { offset: None }));
        assert_eq!(kinds[2], (16, ExtentKind::Unallocated { offset: None }));
        assert_eq!(kinds[3], (16, ExtentKind::Compressed));
        // map_run: the one lookup, never merged.
        let e = map_run(&l, 48, 16).unwrap();
        assert_eq!((e.len, e.kind), (16, ExtentKind::Compressed));
        assert!(map_run(&l, 0, 0).is_err() && map_run(&l, 60, 8).is_err());
        assert!(read_via(&l, &mut buf, 1).is_err(), "range checked");
    }

    #[test]
    fn past_eof_policies() {
        let host = MemStorage::from_vec(vec![3; 10]);
        let mut buf = [1u8; 8];
        assert!(HostRun::new(&host, 6).read(&mut buf).is_err());
        HostRun::new(&host, 6)
            .past_eof(PastEof::Zero)
            .read(&mut buf)
            .unwrap();
        assert_eq!(buf, [3, 3, 3, 3, 0, 0, 0, 0]);
        let corrupt = PastEof::Corrupt {
            format: "x",
            what: "past the end",
            offset: 4,
        };
        let e = HostRun::new(&host, 6).past_eof(corrupt).read(&mut buf);
        assert!(matches!(
            e,
            Err(Error::Corrupt {
                offset: Some(4),
                ..
            })
        ));
    }

    #[test]
    fn guard_write_checks_read_only_first() {
        assert!(matches!(guard_write(true, 99, 1, 10), Err(Error::ReadOnly)));
        assert!(matches!(
            guard_write(false, 9, 2, 10),
            Err(Error::OutOfRange { .. })
        ));
        guard_write(false, 9, 1, 10).unwrap();
    }
}
