//! The async face of a [`BlockDevice`]: [`AsyncDevice`], whose requests return
//! [`IoFuture`]s that any executor (or none: `pollster::block_on`, a hand-written poll
//! loop) can drive. Nothing here depends on a runtime.
//!
//! - **Reads** are planned by the device's layout walk ([`BlockDevice::walk_runs`], the
//!   one place every format on the guest-I/O skeleton answers): zero runs are filled at
//!   once, and host runs in an io_uring storage ([`UringStorage`](crate::UringStorage))
//!   are submitted together without a blocked thread; the io_uring completion thread
//!   completes the future. Many reads of one thread are thus in flight at once (the
//!   queue depth is the [`Uring`](crate::Uring)'s).
//! - Everything else — writes, zeroes, discards, flushes, reads of runs that need the
//!   format (backing files, compressed or encrypted data), reads of devices without a
//!   walk or on other storages — runs the synchronous method on a small pool of worker
//!   threads, which completes the future.
//!
//! Buffers are owned ([`IoBuf`]) and handed back by the future, so dropping a future
//! early never leaves the kernel writing into freed memory.
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{AsyncDevice, BlockDevice, IoBuf};
//! # use diskimg_blockio::{DeviceInfo, Extent, ExtentKind, MemStorage, Result, Storage};
//! # #[derive(Debug)] struct Flat(MemStorage);
//! # impl BlockDevice for Flat {
//! #     fn info(&self) -> DeviceInfo { DeviceInfo::new("raw", 8192) }
//! #     fn read_at(&self, b: &mut [u8], o: u64) -> Result<()> { self.0.read_exact_at(b, o) }
//! #     fn write_at(&self, b: &[u8], o: u64) -> Result<()> { self.0.write_all_at(b, o) }
//! #     fn flush(&self) -> Result<()> { Ok(()) }
//! #     fn map(&self, o: u64, l: u64) -> Result<Extent> {
//! #         Ok(Extent { offset: o, len: l, kind: ExtentKind::Data { offset: Some(o) } }) }
//! #     fn as_any(&self) -> &dyn std::any::Any { self }
//! # }
//! # let dev: Arc<dyn BlockDevice> = Arc::new(Flat(MemStorage::from_vec(vec![0; 8192])));
//! let aio = AsyncDevice::new(dev)?;
//! pollster::block_on(async {
//!     let mut buf = IoBuf::new(4096);
//!     buf.fill(0xab);
//!     let _buf = aio.write_at(buf, 4096).await?;
//!     aio.flush().await?;
//!     let back = aio.read_at(IoBuf::new(4096), 4096).await?;
//!     assert!(back.iter().all(|&b| b == 0xab));
//!     Ok::<(), diskimg_blockio::Error>(())
//! })?;
//! # Ok::<(), diskimg_blockio::Error>(())
//! ```

use std::sync::Arc;

use crate::device::{BlockDevice, ZeroFlags};
use crate::error::{Error, Result};

mod buf;
mod pool;
#[cfg(target_os = "linux")]
mod read;
#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
mod tests;

pub use buf::{IO_ALIGN, IoBuf};
pub use pool::IoFuture;
use pool::Pool;

/// Batches the io_uring submissions of the calling thread while it is alive: reads
/// started meanwhile ([`AsyncDevice::read_at`] on io_uring storage) go to the kernel
/// together, in one `io_uring_enter` per ring, when the last plug of the thread is
/// dropped — as a virtqueue handler would start every request it popped, then notify
/// once. A thread that polls one of its requests before then (an executor about to
/// wait) submits what is held back first, so holding a plug never stalls a request.
/// Plugs nest; elsewhere than Linux, and for requests that run on workers, a plug
/// changes nothing.
///
/// ```
/// # use std::sync::Arc;
/// # use diskimg_blockio::{AsyncDevice, BlockDevice, IoBuf, Plug};
/// # fn f(aio: &AsyncDevice) -> diskimg_blockio::Result<()> {
/// let futures: Vec<_> = {
///     let _plug = Plug::new();
///     (0..16u64).map(|i| aio.read_at(IoBuf::new(4096), i * 4096)).collect()
/// }; // submitted here, together
/// for f in futures {
///     let _buf = pollster::block_on(f)?;
/// }
/// # Ok(()) }
/// ```
#[must_use = "the plug batches submissions only while it is held"]
pub struct Plug {
    /// A plug belongs to its thread.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Plug {
    /// Plugs the calling thread (see the type's docs).
    pub fn new() -> Self {
        #[cfg(target_os = "linux")]
        crate::storage::plug::enter();
        Self {
            _thread: std::marker::PhantomData,
        }
    }
}

impl Default for Plug {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        crate::storage::plug::exit();
    }
}

impl std::fmt::Debug for Plug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Plug")
    }
}

/// Blocks the calling thread until `ready()` returns true: the parking step of a
/// hand-written executor (poll the futures; if none is ready, park until a waker runs),
/// which lets the thread reap its own io_uring completions.
///
/// While `ready()` is false: if the ring this thread submitted to last has requests in
/// flight and no other thread waits in it, this thread waits in the ring itself
/// (`io_uring_enter` with `IORING_ENTER_GETEVENTS`, submitting what its [`Plug`] held
/// back in the same call) and runs the completions there — its own and other threads' —
/// instead of the ring's completion thread running them and waking it: one wakeup per
/// batch instead of two hand-offs. Otherwise it parks ([`std::thread::park`]): the
/// futures' wakers must then unpark it (as a waker built on [`std::thread::Thread`]
/// does), and `ready()` should read what they set.
///
/// A wake from elsewhere than the ring (a request that ran on a worker) is seen once the
/// ring wait returns, that is after the next of the ring's requests completes; elsewhere
/// than Linux this is `std::thread::park` in a loop.
///
/// ```
/// # use std::sync::Arc;
/// # use std::sync::atomic::{AtomicBool, Ordering};
/// # use std::task::{Context, Poll, Wake, Waker};
/// # use diskimg_blockio::{AsyncDevice, IoBuf};
/// struct Flag(AtomicBool, std::thread::Thread);
/// impl Wake for Flag {
///     fn wake(self: Arc<Self>) {
///         self.0.store(true, Ordering::Release);
///         self.1.unpark();
///     }
/// }
/// # fn f(aio: &AsyncDevice) -> diskimg_blockio::Result<()> {
/// let flag = Arc::new(Flag(AtomicBool::new(false), std::thread::current()));
/// let waker = Waker::from(flag.clone());
/// let mut fut = std::pin::pin!(aio.read_at(IoBuf::new(4096), 0));
/// let buf = loop {
///     flag.0.store(false, Ordering::Release);
///     if let Poll::Ready(r) = fut.as_mut().poll(&mut Context::from_waker(&waker)) {
///         break r?;
///     }
///     diskimg_blockio::park_until(|| flag.0.load(Ordering::Acquire));
/// };
/// # Ok(()) }
/// ```
pub fn park_until(ready: impl Fn() -> bool) {
    #[cfg(target_os = "linux")]
    {
        crate::storage::plug::flush();
        crate::storage::park_until(&ready);
    }
    #[cfg(not(target_os = "linux"))]
    while !ready() {
        std::thread::park();
    }
}

/// Worker threads of [`AsyncDevice::new`].
const DEFAULT_WORKERS: usize = 4;

/// A [`BlockDevice`] with an async face (see the module doc); cheap to share by `Arc`.
/// The synchronous device stays usable beside it.
pub struct AsyncDevice {
    dev: Arc<dyn BlockDevice>,
    pool: Pool,
}

impl std::fmt::Debug for AsyncDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncDevice")
            .field("dev", &self.dev)
            .finish()
    }
}

impl AsyncDevice {
    /// The async face of `dev`, with four worker threads.
    pub fn new(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        Self::with_workers(dev, DEFAULT_WORKERS)
    }

    /// The async face of `dev` with `workers` threads for the requests that block (at
    /// least one): as many of them run at once.
    pub fn with_workers(dev: Arc<dyn BlockDevice>, workers: usize) -> Result<Self> {
        let pool = Pool::new(workers).map_err(|e| Error::io("could not start workers", e))?;
        Ok(Self { dev, pool })
    }

    /// The synchronous device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Fills `buf` with the guest bytes at `offset`; the future returns it.
    pub fn read_at(&self, buf: IoBuf, offset: u64) -> IoFuture<IoBuf> {
        #[cfg(target_os = "linux")]
        let buf = match read::submit(&self.dev, &self.pool.shared, buf, offset) {
            Ok(f) => return f,
            Err(buf) => buf,
        };
        self.blocking(buf, move |dev, b| dev.read_at(b.as_mut_slice(), offset))
    }

    /// Writes `buf` at guest `offset`; the future returns it.
    pub fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<IoBuf> {
        self.blocking(buf, move |dev, b| dev.write_at(b.as_slice(), offset))
    }

    /// [`BlockDevice::write_zeroes`].
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<()> {
        self.blocking((), move |dev, ()| dev.write_zeroes(offset, len, flags))
    }

    /// [`BlockDevice::discard`].
    pub fn discard(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.blocking((), move |dev, ()| dev.discard(offset, len))
    }

    /// [`BlockDevice::flush`]: durable are the requests completed before it was called.
    pub fn flush(&self) -> IoFuture<()> {
        self.blocking((), |dev, ()| dev.flush())
    }

    /// Runs `op` on a worker with the device and `value`, which the future returns.
    fn blocking<T: Send + 'static>(
        &self,
        mut value: T,
        op: impl FnOnce(&dyn BlockDevice, &mut T) -> Result<()> + Send + 'static,
    ) -> IoFuture<T> {
        let (fut, slot) = IoFuture::new();
        let dev = self.dev.clone();
        self.pool.shared.spawn(move || {
            let r = op(dev.as_ref(), &mut value).map(|()| value);
            slot.complete(r);
        });
        fut
    }
}
