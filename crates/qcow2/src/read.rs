//! The read path: qcow2 answers the mapping lookup of the shared guest-I/O skeleton
//! ([`diskimg_blockio::Layout`]) and blockio's [`read_via`]/[`map_run`] do the splitting,
//! the reads and `map`, so read and map agree by construction.
//!
//! Lookups of cached L2 tables run under the shared metadata lock (readers do not exclude
//! each other); a miss loads the table under the exclusive lock. No lock is held while
//! guest data is read. Compressed and encrypted clusters are special runs qcow2 decodes
//! itself; the copy-on-write path reads with the lock already held ([`Qcow2Device::read_locked`]).

use std::cell::RefCell;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, DebugEvent, Error, Extent, ExtentKind, Holes, HostRun, Layout, Mapping, PastEof,
    Result, RunFn, map_run, read_via, walk,
};

use crate::device::Qcow2Device;
use crate::disk::compress;
use crate::disk::table::Sub;
use crate::engine::meta::{Cached, Meta, read_host};
use crate::errors::internal;

impl Qcow2Device {
    /// [`Meta::resolve`] under the shared lock when the L2 tables are cached, under the
    /// exclusive one otherwise.
    fn resolve(&self, guest: u64, max: u64) -> Result<(Sub, u64)> {
        if let Cached::Hit((sub, n, _)) = self.shared().resolve_cached(guest, max)? {
            return Ok((sub, n));
        }
        self.lock().resolve(guest, max)
    }

    /// Reads one run resolved under the lock into `dst` (copy-on-write's reads).
    fn read_run(&self, sub: Sub, dst: &mut [u8], guest: u64) -> Result<()> {
        match sub {
            Sub::Data(h) => self.read_data(dst, h, guest),
            Sub::Zero | Sub::ZeroAlloc(_) => {
                dst.fill(0);
                Ok(())
            }
            Sub::Unalloc => {
                diskimg_blockio::read_from_backing(self.backing().as_deref(), dst, guest)
            }
            Sub::Compressed(h, clen) => self.read_compressed_part(h, clen, dst, guest),
        }
    }

    /// Reads guest data at host `h` (in the data file when there is one), decrypting.
    fn read_data(&self, dst: &mut [u8], h: u64, guest: u64) -> Result<()> {
        let s = self.data.as_ref().unwrap_or(&self.file);
        s.debug_event(DebugEvent::ReadAio);
        match &self.crypt {
            Some(c) => c.read(s.as_ref(), dst, h, guest),
            None => read_host(s.as_ref(), dst, h),
        }
    }

    /// Reads guest bytes at `guest` (`dst.len()` of them, inside one cluster) of the
    /// compressed cluster at host `h` (at most `clen` bytes).
    fn read_compressed_part(&self, h: u64, clen: u64, dst: &mut [u8], guest: u64) -> Result<()> {
        let (cs, ty) = {
            let m = self.shared();
            (m.cs(), m.h().compression_type)
        };
        if guest.is_multiple_of(cs) && dst.len() as u64 == cs {
            // A whole cluster (convert reads whole chunks): inflate in place.
            return self.read_compressed(ty, h, clen, dst);
        }
        let mut cluster = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        self.read_compressed(ty, h, clen, &mut cluster)?;
        let start = usize::try_from(guest % cs).unwrap_or(0);
        let src = cluster
            .get(start..start.saturating_add(dst.len()))
            .ok_or(Error::corrupt("qcow2", "compressed read", h))?;
        dst.copy_from_slice(src);
        Ok(())
    }

    /// Inflates the compressed cluster at host `h` (at most `clen` bytes) into `out`.
    pub(crate) fn read_compressed(&self, ty: u8, h: u64, clen: u64, out: &mut [u8]) -> Result<()> {
        // `clen` counts whole sectors and may reach past the end of the file (the last
        // cluster): the length is only asked for when the whole read fails.
        let mut input = vec![0u8; usize::try_from(clen).unwrap_or(0)];
        self.file.debug_event(DebugEvent::ReadCompressed);
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
            let dst = buf.get_mut(done..done + n).ok_or(internal("read range"))?;
            match sub {
                Sub::Compressed(h, clen) => {
                    let cs = m.cs();
                    let mut cluster = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                    self.read_compressed(m.h().compression_type, h, clen, &mut cluster)?;
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

    /// [`BlockDevice::read_at`]: [`read_via`] over a [`View`].
    pub(crate) fn read_guest(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_via(&View::reading(self), buf, offset)
    }

    /// [`BlockDevice::walk_runs`]: [`walk`] over a [`View`] (vectored and async reads plan
    /// with it), except for a writable image on io_uring storage. There the async face
    /// reads the planned host runs after the walk returns, and a cluster freed meanwhile
    /// (discard, copy-on-write of a compressed cluster) could be reused for other guest
    /// data; without a walk it reads through [`BlockDevice::read_at`] on a worker, whose
    /// lookup and read follow each other as every synchronous read's do. A read-only image
    /// frees nothing. Vectored reads (`read_vectored_at`) read each run inside the walk.
    /// The host epoch (`engine::epoch`, [`BlockDevice::host_epoch`]) is what lets a
    /// detached reader notice such a reuse: this refusal stays until the async face
    /// checks it (taken before the walk, compared after the reads completed); callers
    /// that check it themselves can plan on storages without a ring of their own.
    pub(crate) fn walk_guest(&self, offset: u64, len: u64, f: &mut RunFn<'_>) -> Result<bool> {
        #[cfg(target_os = "linux")]
        if !self.read_only
            && (self.file.uring().is_some()
                || self.data.as_ref().is_some_and(|d| d.uring().is_some()))
        {
            return Ok(false);
        }
        walk(&View::reading(self), offset, len, f)
    }

    /// [`BlockDevice::map`]: [`map_run`] over a [`View`]: the run one lookup resolves (as
    /// long as the L2 tables make it), not merged further, as qcow2's `map` always
    /// answered (`convert` sizes its reads of compressed extents by them).
    pub(crate) fn map_guest(&self, offset: u64, len: u64) -> Result<Extent> {
        map_run(&View::new(self), offset, len)
    }
}

/// A run qcow2 decodes itself, noted by [`View::lookup`] for [`View::read_special`].
#[derive(Clone, Copy, Debug)]
enum Special {
    /// Encrypted data: guest offset `guest` is at host offset `host`.
    Encrypted { guest: u64, host: u64 },
    /// A compressed cluster at host `host`, at most `len` bytes.
    Compressed { host: u64, len: u64 },
}

/// The per-request [`Layout`] of a qcow2 image: each lookup resolves under the metadata
/// lock ([`Qcow2Device::resolve`]) and releases it before the data is read.
struct View<'a> {
    dev: &'a Qcow2Device,
    /// The image's size when the request started.
    size: u64,
    /// The request reads the runs it looks up (not `map`): each host run raises
    /// [`DebugEvent::ReadAio`] on its storage, as qemu's read tasks do.
    reads: bool,
    /// The special runs handed out so far (the token is the index).
    specials: RefCell<Vec<Special>>,
}

impl<'a> View<'a> {
    fn new(dev: &'a Qcow2Device) -> Self {
        Self {
            dev,
            size: dev.size(),
            reads: false,
            specials: RefCell::new(Vec::new()),
        }
    }

    /// A view for a request that reads what it looks up.
    fn reading(dev: &'a Qcow2Device) -> Self {
        Self {
            reads: true,
            ..Self::new(dev)
        }
    }

    fn special(&self, kind: ExtentKind, s: Special) -> Mapping<'a> {
        let mut v = self.specials.borrow_mut();
        v.push(s);
        Mapping::Special {
            kind,
            token: v.len() as u64 - 1,
        }
    }
}

impl Layout for View<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&self, offset: u64, max: u64) -> Result<(Mapping<'_>, u64)> {
        let (sub, n) = self.dev.resolve(offset, max)?;
        let n = n.clamp(1, max);
        // As qemu: no host offsets for encrypted data (they would expose ciphertext).
        let clear = self.dev.crypt.is_none();
        let mapping = match sub {
            Sub::Data(host) if clear => {
                let s = self.dev.data.as_ref().unwrap_or(&self.dev.file);
                if self.reads {
                    s.debug_event(DebugEvent::ReadAio);
                }
                // qemu reads past the end of the file as zeroes. `map` of a
                // metadata-preallocated image reports the file's holes as data that
                // reads as zeroes (qemu's recursion into the file).
                let holes = if !self.reads && self.dev.map_sees_holes() {
                    Holes::DataZero
                } else {
                    Holes::Ignored
                };
                Mapping::Host(
                    HostRun::new(s.as_ref(), host)
                        .past_eof(PastEof::Zero)
                        .holes(holes),
                )
            }
            Sub::Data(host) => self.special(
                ExtentKind::Data { offset: None },
                Special::Encrypted {
                    guest: offset,
                    host,
                },
            ),
            Sub::ZeroAlloc(h) => Mapping::Zero {
                host: Some(h).filter(|_| clear),
            },
            Sub::Zero => Mapping::Zero { host: None },
            // `map` (not reads) reports the space an extended-L2 cluster reserved for
            // its unwritten subclusters, as qemu (not for encrypted images).
            Sub::Unalloc if !self.reads && clear => {
                let (host, m) = self.dev.unallocated_host(offset, n)?;
                return Ok((Mapping::Unallocated { host }, m.clamp(1, n)));
            }
            Sub::Unalloc => Mapping::Unallocated { host: None },
            Sub::Compressed(host, len) => {
                self.special(ExtentKind::Compressed, Special::Compressed { host, len })
            }
        };
        Ok((mapping, n))
    }

    fn read_special(&self, token: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let s = usize::try_from(token)
            .ok()
            .and_then(|i| self.specials.borrow().get(i).copied())
            .ok_or(internal("qcow2: unknown special run"))?;
        match s {
            Special::Encrypted { guest, host } => {
                let at = offset
                    .checked_sub(guest)
                    .and_then(|d| host.checked_add(d))
                    .ok_or(internal("qcow2: encrypted run offset"))?;
                self.dev.read_data(buf, at, offset)
            }
            Special::Compressed { host, len } => {
                self.dev.read_compressed_part(host, len, buf, offset)
            }
        }
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.dev.backing()
    }
}
