#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    missing_docs,
    unreachable_pub
)]
//! The NBD server against hostile and broken clients (raw bytes over TCP), the
//! vhost-user-blk server against broken frontends, and the library API. Real clients
//! (qemu-img, qemu-io, nbdinfo, nbdcopy, fio, a QEMU guest) are driven through the
//! `diskimg serve` command in the CLI's tests.

mod bad_clients;
mod client;
mod extended;
mod panics;
mod protocol;
mod vhost_bad;
mod vhost_client;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Result, Storage,
    ZeroFlags, forward_device,
};
use diskimg_serve::{Export, ExportOptions, Listener, NbdConfig, NbdServer, Shutdown};

/// A device that records whether a write is still unflushed.
#[derive(Debug)]
pub struct Tracked {
    pub inner: Arc<dyn BlockDevice>,
    pub dirty: AtomicBool,
    pub flushes: AtomicU64,
}

impl BlockDevice for Tracked {
    forward_device!(inner: info, read_at, discard, map);
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.dirty.store(true, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.dirty.store(true, Ordering::SeqCst);
        self.inner.write_zeroes(offset, len, flags)
    }
    fn flush(&self) -> Result<()> {
        self.dirty.store(false, Ordering::SeqCst);
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A raw device of `size` bytes in memory.
pub fn mem_raw(size: u64) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    diskimg_raw::DRIVER
        .create(s.clone(), &mut CreateRequest::new(size, OptionList::new()))
        .unwrap();
    diskimg_raw::DRIVER.open(s, &OpenOptions::new()).unwrap()
}

/// An in-process server on 127.0.0.1 (random port) for one export.
pub struct Running {
    pub port: u16,
    pub shutdown: Shutdown,
    pub device: Arc<Tracked>,
    thread: Mutex<Option<JoinHandle<std::io::Result<()>>>>,
}

impl Running {
    pub fn start(device: Arc<dyn BlockDevice>, opts: ExportOptions, max_conn: usize) -> Running {
        let device = Arc::new(Tracked {
            inner: device,
            dirty: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
        });
        let export = Arc::new(Export::new(device.clone(), opts));
        let listener = Listener::tcp("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut config = NbdConfig::default();
        config.max_connections = max_conn;
        config.persistent = true;
        config.handshake_limit = std::time::Duration::from_secs(2);
        let shutdown = Shutdown::new();
        let sd = shutdown.clone();
        let server = NbdServer::new(export, config);
        let thread = std::thread::spawn(move || server.serve(&listener, &sd));
        Running {
            port,
            shutdown,
            device,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Triggers the shutdown and waits for `serve` to return (bounded).
    pub fn stop(&self) {
        self.shutdown.trigger();
        let t = self.thread.lock().unwrap().take();
        if let Some(t) = t {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !t.is_finished() {
                assert!(std::time::Instant::now() < deadline, "server did not stop");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            t.join().unwrap().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}
