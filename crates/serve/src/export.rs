//! [`Export`]: one device as the protocols serve it, with the policy qemu-nbd applies
//! between a client request and the block layer (discard, detect-zeroes, cache mode).

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use diskimg_blockio::{BlockDevice, Error, MapEntry, ZeroFlags, block_status, check_range};

/// What a client's `TRIM`/discard does (qemu-nbd `--discard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Discard {
    /// Discards succeed and do nothing; write-zeroes never deallocates (qemu's default).
    #[default]
    Ignore,
    /// Discards reach the device, and write-zeroes may deallocate unless the client asks
    /// for `NO_HOLE`.
    Unmap,
}

impl Discard {
    /// Parses qemu's names: `ignore`/`off`, `unmap`/`on`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ignore" | "off" => Some(Discard::Ignore),
            "unmap" | "on" => Some(Discard::Unmap),
            _ => None,
        }
    }
}

/// Whether writes of all-zero buffers become write-zeroes (qemu `--detect-zeroes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes are written as they are.
    #[default]
    Off,
    /// All-zero writes become write-zeroes that keep the space allocated.
    On,
    /// All-zero writes become write-zeroes that may deallocate (with [`Discard::Unmap`]).
    Unmap,
}

impl DetectZeroes {
    /// Parses qemu's names: `off`, `on`, `unmap`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(DetectZeroes::Off),
            "on" => Some(DetectZeroes::On),
            "unmap" => Some(DetectZeroes::Unmap),
            _ => None,
        }
    }
}

/// When writes reach stable storage (qemu `--cache`: `none` and `directsync` flush
/// like `writeback` and `writethrough`; whether the host page cache is used is the
/// device's business — `diskimg serve` opens the image `O_DIRECT` for them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Writes are durable after a flush or FUA (qemu's default).
    #[default]
    Writeback,
    /// Every write is flushed before it completes.
    Writethrough,
    /// Flushes are ignored (scratch images only).
    Unsafe,
}

impl CacheMode {
    /// Parses qemu's names (`none` = writeback, `directsync` = writethrough here).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "writeback" | "none" => Some(CacheMode::Writeback),
            "writethrough" | "directsync" => Some(CacheMode::Writethrough),
            "unsafe" => Some(CacheMode::Unsafe),
            _ => None,
        }
    }
}

/// Why a request failed, in the NBD protocol's error vocabulary (vhost-user folds these
/// into virtio's `IOERR`/`UNSUPP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Write to a read-only export (`NBD_EPERM`).
    Perm,
    /// The device failed (`NBD_EIO`).
    Io,
    /// Bad offset, length or flags (`NBD_EINVAL`).
    Inval,
    /// Write beyond the end, or the host is full (`NBD_ENOSPC`).
    NoSpc,
    /// Too large for one reply (`NBD_EOVERFLOW`).
    Overflow,
    /// Cannot be done quickly (`NBD_ENOTSUP`, fast zero).
    NotSup,
    /// The server is shutting down (`NBD_ESHUTDOWN`).
    Shutdown,
}

impl Fault {
    /// The NBD protocol's error value.
    pub fn nbd_code(self) -> u32 {
        match self {
            Fault::Perm => 1,
            Fault::Io => 5,
            Fault::Inval => 22,
            Fault::NoSpc => 28,
            Fault::Overflow => 75,
            Fault::NotSup => 95,
            Fault::Shutdown => 108,
        }
    }

    fn from_error(e: &Error) -> Self {
        match e {
            Error::ReadOnly => Fault::Perm,
            Error::OutOfRange { .. } => Fault::Inval,
            Error::Io { source, .. } => match source.raw_os_error() {
                // ENOSPC, EFBIG, EDQUOT
                Some(28 | 27 | 122) => Fault::NoSpc,
                _ => Fault::Io,
            },
            _ => Fault::Io,
        }
    }
}

/// How an [`Export`] treats requests: name, read-only, discard, zero detection, cache.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ExportOptions {
    /// The export name clients ask for (qemu-nbd `-x`, default empty).
    pub name: String,
    /// A description for `NBD_OPT_LIST` / `NBD_INFO_DESCRIPTION` (qemu-nbd `-D`).
    pub description: String,
    /// Refuse writes (also implied by a read-only device).
    pub read_only: bool,
    /// Discard, zero detection and cache mode.
    pub policy: WritePolicy,
}

/// The write-path policy of an export (grouped so it can be copied around).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WritePolicy {
    /// What TRIM and write-zeroes may deallocate.
    pub discard: Discard,
    /// All-zero write detection.
    pub detect_zeroes: DetectZeroes,
    /// When writes are flushed.
    pub cache: CacheMode,
}

impl ExportOptions {
    /// Options for an export called `name`.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// One device as the servers export it. Cheap to share (`Arc`) between connections:
/// the device does its own locking, so every connection sees every completed write.
#[derive(Debug)]
pub struct Export {
    device: Arc<dyn BlockDevice>,
    options: ExportOptions,
    read_only: bool,
    size: u64,
}

impl Export {
    /// Exports `device` with `options`.
    pub fn new(device: Arc<dyn BlockDevice>, options: ExportOptions) -> Self {
        let info = device.info();
        Self {
            read_only: options.read_only || info.read_only,
            size: info.virtual_size,
            device,
            options,
        }
    }

    /// The device served.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The export description.
    pub fn description(&self) -> &str {
        &self.options.description
    }

    /// The guest size in bytes (fixed for the life of the export).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The write-path policy.
    pub fn policy(&self) -> WritePolicy {
        self.options.policy
    }

    /// Fails with [`Fault::Inval`] unless the range lies within the export.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), Fault> {
        check_range(offset, len, self.size).map_err(|_| Fault::Inval)
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), Fault> {
        if self.read_only {
            return Err(Fault::Perm);
        }
        check_range(offset, len, self.size).map_err(|_| Fault::NoSpc)
    }

    /// Reads guest bytes.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Fault> {
        self.check(offset, buf.len() as u64)?;
        self.device.read_at(buf, offset).map_err(|e| fault(&e))
    }

    /// Fills a scatter-gather list (consecutive in guest space) from `offset`: one
    /// buffer as [`Export::read`] does, several with the device's vectored read (one
    /// `preadv` per host run). The vhost-user-blk device reads into guest memory so.
    pub fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<(), Fault> {
        self.check(offset, vectored_len(bufs.iter().map(|b| b.len())))?;
        let r = match bufs {
            [buf] => self.device.read_at(buf, offset),
            _ => self.device.read_vectored_at(bufs, offset),
        };
        r.map_err(|e| fault(&e))
    }

    /// Writes guest bytes; `fua` makes them durable before returning.
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), Fault> {
        self.write_vectored(&[IoSlice::new(buf)], offset, fua)
    }

    /// Writes a scatter-gather list (consecutive in guest space) at `offset`, as
    /// [`Export::write`] writes one buffer.
    pub fn write_vectored(
        &self,
        bufs: &[IoSlice<'_>],
        offset: u64,
        fua: bool,
    ) -> Result<(), Fault> {
        let len = vectored_len(bufs.iter().map(|b| b.len()));
        self.writable(offset, len)?;
        let p = self.options.policy;
        if p.detect_zeroes != DetectZeroes::Off
            && len > 0
            && bufs.iter().all(|b| diskimg_blockio::bytes::is_zero(b))
        {
            let unmap = p.detect_zeroes == DetectZeroes::Unmap && p.discard == Discard::Unmap;
            let flags = ZeroFlags { may_unmap: unmap };
            self.device
                .write_zeroes(offset, len, flags)
                .map_err(|e| fault(&e))?;
        } else if let [buf] = bufs {
            self.device.write_at(buf, offset).map_err(|e| fault(&e))?;
        } else {
            self.device
                .write_vectored_at(bufs, offset)
                .map_err(|e| fault(&e))?;
        }
        self.after_write(fua)
    }

    /// Makes a range read as zeroes. Without `no_hole` (and with [`Discard::Unmap`]) the
    /// device may deallocate it. With `fast`, fails with [`Fault::NotSup`] unless the
    /// device can do it without writing zero buffers.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), Fault> {
        self.writable(offset, len)?;
        if fast && !self.fast_zero(offset, len) {
            return Err(Fault::NotSup);
        }
        let may_unmap = !no_hole && self.options.policy.discard == Discard::Unmap;
        if len > 0 {
            self.device
                .write_zeroes(offset, len, ZeroFlags { may_unmap })
                .map_err(|e| fault(&e))?;
        }
        self.after_write(fua)
    }

    /// Discards a range (a hint: does nothing unless [`Discard::Unmap`]).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Fault> {
        if self.read_only {
            return Err(Fault::Perm);
        }
        self.check(offset, len)?;
        if self.options.policy.discard == Discard::Unmap && len > 0 {
            match self.device.discard(offset, len) {
                Ok(()) => {}
                // A discard is a hint: a format that cannot discard ignores it.
                Err(e) if e.is_unsupported() => {}
                Err(e) => return Err(fault(&e)),
            }
        }
        self.after_write(fua)
    }

    /// Makes every completed write durable (nothing with [`CacheMode::Unsafe`]).
    pub fn flush(&self) -> Result<(), Fault> {
        if self.read_only || self.options.policy.cache == CacheMode::Unsafe {
            return Ok(());
        }
        self.device.flush().map_err(|e| fault(&e))
    }

    fn after_write(&self, fua: bool) -> Result<(), Fault> {
        if fua || self.options.policy.cache == CacheMode::Writethrough {
            return self.device.flush().map_err(|e| fault(&e));
        }
        Ok(())
    }

    /// Whether write-zeroes of this range is a metadata operation (raw: fallocate;
    /// qcow2: whole clusters get the zero flag).
    fn fast_zero(&self, offset: u64, len: u64) -> bool {
        let info = self.device.info();
        match info.format {
            "raw" => !info.encrypted,
            "qcow2" => {
                let cs = info.cluster_size.unwrap_or(u64::MAX).max(1);
                let end = offset.saturating_add(len);
                offset.is_multiple_of(cs) && (end.is_multiple_of(cs) || end == self.size)
            }
            _ => false,
        }
    }

    /// What the range starting at `offset` (at most `len` bytes, non-zero) is, across
    /// the whole backing chain.
    pub fn status(&self, offset: u64, len: u64) -> Result<MapEntry, Fault> {
        self.check(offset, len)?;
        block_status(self.device.as_ref(), offset, len).map_err(|e| fault(&e))
    }
}

/// The total length of a buffer list (saturating: an impossible length then fails the
/// range check).
fn vectored_len(lens: impl Iterator<Item = usize>) -> u64 {
    lens.fold(0u64, |t, l| t.saturating_add(l as u64))
}

fn fault(e: &Error) -> Fault {
    Fault::from_error(e)
}
