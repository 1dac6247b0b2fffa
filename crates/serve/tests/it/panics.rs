//! A device that panics (a Rust program's own device exported through the library, or
//! a bug) costs only the request that hit it: its connection is closed, the server goes
//! on serving the next client, and shutdown still flushes the export and returns, so
//! `diskimg serve` never waits forever holding the image's lock.

use std::io::{ErrorKind, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diskimg_blockio::{BlockDevice, Result, forward_device};
use diskimg_serve::{Export, ExportOptions, Listener, NbdConfig, NbdServer, Shutdown};

use crate::client::*;
use crate::{Running, Tracked, mem_raw};

/// A read of this offset panics.
const PANIC_AT: u64 = 64 << 10;
/// A write at this offset takes [`SLOW`].
const SLOW_AT: u64 = 128 << 10;
const SLOW: Duration = Duration::from_millis(300);

/// Wraps a device: panics on a read at [`PANIC_AT`], dawdles on a write at [`SLOW_AT`].
#[derive(Debug)]
pub struct Panicky(pub Arc<dyn BlockDevice>);

impl BlockDevice for Panicky {
    forward_device!(0: info, write_zeroes, discard, flush, map);
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        assert_ne!(offset, PANIC_AT, "the test device panics here");
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if offset == SLOW_AT {
            std::thread::sleep(SLOW);
        }
        self.0.write_at(buf, offset)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn panicky() -> Arc<dyn BlockDevice> {
    Arc::new(Panicky(mem_raw(1 << 20)))
}

/// Whether the server ended the connection: end of stream or a reset within 10 s (a
/// read that times out is a connection left open, and `false`).
fn ended(c: &mut Client) -> bool {
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    match c.s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// A client connected, negotiated, that wrote 512 bytes at 0.
fn writer(port: u16) -> Client {
    let mut c = Client::connect(port, 3).unwrap();
    c.go("");
    c.request(0, CMD_WRITE, 1, 0, 512, &[5; 512]);
    assert_eq!(c.reply(1, 0).unwrap().error, 0);
    c
}

#[test]
fn a_panicking_request_closes_only_its_connection() {
    // One client at a time, persistent: the next client is served only once the
    // panicked connection left the count.
    let srv = Running::start(panicky(), ExportOptions::default(), 1);
    let mut c = writer(srv.port);
    c.request(0, CMD_READ, 2, PANIC_AT, 512, &[]);
    assert!(ended(&mut c), "the panicked connection was left open");
    drop(c);
    let mut c = Client::connect(srv.port, 3).expect("the next client was not served");
    c.go("");
    c.request(0, CMD_READ, 3, 0, 512, &[]);
    assert_eq!(c.reply(3, 0).unwrap().data, vec![5; 512]);
    c.request(0, CMD_DISC, 4, 0, 0, &[]);
    drop(c);
    srv.stop();
    assert!(!srv.device.dirty.load(Ordering::SeqCst), "not flushed");
}

#[test]
fn a_panic_on_a_helper_thread_ends_the_connection_after_the_others_reply() {
    // The slow write keeps the connection's first thread busy, so the read that panics
    // runs on a helper it started.
    let srv = Running::start(panicky(), ExportOptions::default(), 0);
    let mut c = writer(srv.port);
    c.request(0, CMD_WRITE, 2, SLOW_AT, 512, &[6; 512]);
    c.request(0, CMD_READ, 3, PANIC_AT, 512, &[]);
    assert_eq!(c.reply(2, 0).unwrap().error, 0, "the slow write's reply");
    assert!(
        ended(&mut c),
        "the connection outlived its panicked request"
    );
    drop(c);
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.go("");
    c.request(0, CMD_READ, 4, SLOW_AT, 512, &[]);
    assert_eq!(c.reply(4, 0).unwrap().data, vec![6; 512]);
    drop(c);
    srv.stop();
    assert!(!srv.device.dirty.load(Ordering::SeqCst), "not flushed");
}

#[test]
fn a_server_whose_last_client_panicked_ends_flushed() {
    // Not persistent (qemu-nbd without -t): the panicked client was the last one, so
    // the server stops by itself, after the final flush.
    let device = Arc::new(Tracked {
        inner: panicky(),
        dirty: AtomicBool::new(false),
        flushes: AtomicU64::new(0),
    });
    let export = Arc::new(Export::new(device.clone(), ExportOptions::default()));
    let listener = Listener::tcp("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = NbdConfig::default();
    config.persistent = false;
    let shutdown = Shutdown::new();
    let sd = shutdown.clone();
    let server = std::thread::spawn(move || NbdServer::new(export, config).serve(&listener, &sd));
    let mut c = writer(port);
    c.request(0, CMD_READ, 2, PANIC_AT, 512, &[]);
    assert!(ended(&mut c));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.is_finished() {
        assert!(
            Instant::now() < deadline,
            "serve() still waits for the panicked connection"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    server.join().unwrap().unwrap();
    assert!(shutdown.is_triggered());
    assert!(!device.dirty.load(Ordering::SeqCst), "not flushed");
    assert!(device.flushes.load(Ordering::SeqCst) >= 1);
}
