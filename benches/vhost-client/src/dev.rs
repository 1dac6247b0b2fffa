//! One vhost-user-blk device driven through libblkio (`blkio`'s `virtio-blk-vhost-user`
//! driver, the one fio's libblkio engine and QEMU's `virtio-blk-vhost-user` blockdev use).
//!
//! This is the only module with `unsafe`: libblkio takes its buffers as raw pointers into a
//! memory region it shares with the server (a memfd mapped into both processes), and the
//! server writes into them while a request is in flight. The module keeps every pointer
//! inside the one region it allocated (offsets and lengths are checked against it), keeps
//! the region alive as long as the queue (`Blkio` and `Blkioq` free it only when both are
//! dropped), and hands out the region's bytes as a slice only while no request is in
//! flight, so safe code never sees memory the server may be writing.
#![allow(unsafe_code)]

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags, iovec};
use std::mem::MaybeUninit;
use std::time::Duration;

/// Longest [`Device::wait`] waits for its completions.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// What a finished request reports: the tag it was queued with and its result (0 or
/// a negative errno).
#[derive(Clone, Copy, Debug)]
pub struct Done {
    /// The tag given when the request was queued.
    pub tag: usize,
    /// 0 on success, else a negative errno.
    pub ret: i32,
}

/// A piece of the shared buffer: byte offset into it and length.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// Offset into the device's buffer.
    pub off: usize,
    /// Length in bytes.
    pub len: usize,
}

/// The device limits a driver must honour, as libblkio read them from the server's
/// virtio-blk config space.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Device size in bytes.
    pub capacity: u64,
    /// Most data segments in one request (`seg_max`; 1 when the device offers none).
    pub max_segments: usize,
    /// Largest data segment (`size_max`; 0: no limit).
    pub max_segment_len: usize,
    /// Largest request (0: no limit).
    pub max_transfer: usize,
    /// Whether the server refuses writes.
    pub read_only: bool,
}

/// A queued request: the caller's tag and its iovec array, if any.
type Pending = (usize, Option<Box<[iovec]>>);

/// A connected device with one queue and one shared buffer.
pub struct Device {
    // Field order matters: the queue is dropped before `Blkio`, which frees the region.
    queue: Blkioq,
    blkio: Blkio,
    region: MemoryRegion,
    inflight: usize,
    // Requests queued or in flight, by the user_data given to libblkio: the caller's tag
    // and the iovec array, which libblkio reads when it builds the descriptors (for a
    // request backlogged behind a full ring, at a later do_io), so it lives until then.
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    completions: Vec<MaybeUninit<Completion>>,
}

fn err(e: blkio::Error) -> String {
    format!("{} ({})", e.message(), e.errno())
}

impl Device {
    /// Connects to the vhost-user-blk socket at `path` with one queue of `queue_size`
    /// descriptors and a shared buffer of `buf_len` bytes (rounded up to the region
    /// alignment). libblkio refuses to start a writable driver on a device that offers
    /// `VIRTIO_BLK_F_RO` (`EROFS`), and fails writes of a `read_only` one itself.
    pub fn connect(
        path: &str,
        queue_size: i32,
        buf_len: usize,
        read_only: bool,
    ) -> Result<Device, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err)?;
        b.set_str("path", path).map_err(err)?;
        b.set_bool("read-only", read_only).map_err(err)?;
        b.connect().map_err(err)?;
        b.set_i32("num-queues", 1).map_err(err)?;
        b.set_i32("queue-size", queue_size).map_err(err)?;
        let mut out = b.start().map_err(err)?;
        let queue = out.queues.pop().ok_or("libblkio started no queue")?;
        let align = usize::try_from(b.get_u64("mem-region-alignment").map_err(err)?)
            .map_err(|e| e.to_string())?
            .max(1);
        let len = buf_len.max(1).div_ceil(align) * align;
        let region = b.alloc_mem_region(len).map_err(err)?;
        b.map_mem_region(&region).map_err(err)?;
        Ok(Device {
            queue,
            blkio: b,
            region,
            inflight: 0,
            slots: Vec::new(),
            free: Vec::new(),
            completions: Vec::new(),
        })
    }

    /// The device's limits.
    pub fn limits(&self) -> Result<Limits, String> {
        let b = &self.blkio;
        let int = |name: &str| -> Result<usize, String> {
            let v = b.get_i32(name).map_err(err)?;
            Ok(usize::try_from(v).unwrap_or(0))
        };
        Ok(Limits {
            capacity: b.get_u64("capacity").map_err(err)?,
            max_segments: int("max-segments")?.max(1),
            max_segment_len: int("max-segment-len")?,
            max_transfer: int("max-transfer")?,
            read_only: b.get_bool("read-only").map_err(err)?,
        })
    }

    /// The shared buffer's bytes, or `None` while requests are in flight.
    pub fn buf(&mut self) -> Option<&mut [u8]> {
        if self.inflight > 0 {
            return None;
        }
        // SAFETY: the region is ours, mapped read/write for `len` bytes until `blkio` and
        // `queue` are dropped (they outlive the returned borrow of `self`), and no request
        // is in flight, so the server does not touch it now.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len)
        })
    }

    fn iovecs(&self, segs: &[Seg]) -> Result<Box<[iovec]>, String> {
        segs.iter()
            .map(|s| {
                let end = s.off.checked_add(s.len).ok_or("segment overflows")?;
                if end > self.region.len {
                    return Err(format!(
                        "segment {s:?} outside the {}-byte buffer",
                        self.region.len
                    ));
                }
                Ok(iovec {
                    iov_base: (self.region.addr + s.off) as *mut _,
                    iov_len: s.len,
                })
            })
            .collect()
    }

    /// Queues a read of `segs` (pieces of the buffer, in order) from byte `start`.
    pub fn read(&mut self, start: u64, segs: &[Seg], tag: usize) -> Result<(), String> {
        let iov = self.iovecs(segs)?;
        let n = u32::try_from(iov.len()).map_err(|e| e.to_string())?;
        let (ptr, id) = (iov.as_ptr(), self.slot(tag, Some(iov)));
        self.queue.readv(start, ptr, n, id, ReqFlags::empty());
        Ok(())
    }

    /// Queues a write of `segs` at byte `start`.
    pub fn write(&mut self, start: u64, segs: &[Seg], tag: usize) -> Result<(), String> {
        let iov = self.iovecs(segs)?;
        let n = u32::try_from(iov.len()).map_err(|e| e.to_string())?;
        let (ptr, id) = (iov.as_ptr(), self.slot(tag, Some(iov)));
        self.queue.writev(start, ptr, n, id, ReqFlags::empty());
        Ok(())
    }

    fn slot(&mut self, tag: usize, iov: Option<Box<[iovec]>>) -> usize {
        self.inflight += 1;
        match self.free.pop() {
            Some(id) => {
                if let Some(s) = self.slots.get_mut(id) {
                    *s = Some((tag, iov));
                }
                id
            }
            None => {
                self.slots.push(Some((tag, iov)));
                self.slots.len() - 1
            }
        }
    }

    /// Queues a flush.
    pub fn flush(&mut self, tag: usize) {
        let id = self.slot(tag, None);
        self.queue.flush(id, ReqFlags::empty());
    }

    /// Queues a discard of `len` bytes at `start`.
    pub fn discard(&mut self, start: u64, len: u64, tag: usize) {
        let id = self.slot(tag, None);
        self.queue.discard(start, len, id, ReqFlags::empty());
    }

    /// Queues a write-zeroes of `len` bytes at `start` (`unmap`: the server may free them).
    pub fn write_zeroes(&mut self, start: u64, len: u64, unmap: bool, tag: usize) {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        let id = self.slot(tag, None);
        self.queue.write_zeroes(start, len, id, flags);
    }

    /// Submits what is queued and waits for at least `min` completions (fewer only when
    /// fewer are in flight), appending them to `out`.
    pub fn wait(&mut self, min: usize, out: &mut Vec<Done>) -> Result<(), String> {
        let want = self.inflight.max(1);
        if self.completions.len() < want {
            self.completions.resize_with(want, MaybeUninit::uninit);
        }
        let min = min.min(self.inflight);
        // Bounded: a request the ring can never hold (more descriptors than the queue
        // has) would otherwise wait forever in libblkio's backlog.
        let mut timeout = WAIT_LIMIT;
        let n = self
            .queue
            .do_io(&mut self.completions[..want], min, Some(&mut timeout), None)
            .map_err(err)?;
        if n < min {
            return Err(format!("no completion within {WAIT_LIMIT:?}"));
        }
        for c in self.completions.iter().take(n) {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = self.slots.get_mut(c.user_data).and_then(Option::take);
            let (tag, _iov) = slot.ok_or("libblkio completed an unknown request")?;
            self.free.push(c.user_data);
            self.inflight = self.inflight.saturating_sub(1);
            out.push(Done { tag, ret: c.ret });
        }
        Ok(())
    }

    /// Requests queued or in flight.
    pub fn inflight(&self) -> usize {
        self.inflight
    }
}
