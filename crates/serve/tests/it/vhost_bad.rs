//! The vhost-user-blk server against broken frontends (raw vhost-user messages over the
//! unix socket): garbage, absurd sizes, truncated headers and hang-ups end only that
//! frontend's session; the next frontend is served, read-only exports offer `RO` and
//! no discard, and shutdown flushes the export. (A real frontend, QEMU, drives the
//! device in the CLI's guest test, including a read-only disk.)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diskimg_serve::{Export, ExportOptions, Listener, Shutdown, VhostConfig, serve_vhost_user_blk};

use crate::{Tracked, mem_raw};

/// `VHOST_USER_GET_FEATURES` and the header flags (vhost-user spec, "Message types").
const GET_FEATURES: u32 = 1;
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
/// Virtio feature bits the export's mode decides (virtio 1.2 section 5.2.3).
const F_RO: u64 = 1 << 5;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_VERSION_1: u64 = 1 << 32;

struct Vhost {
    sock: PathBuf,
    shutdown: Shutdown,
    device: Arc<Tracked>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Vhost {
    fn start(read_only: bool) -> Vhost {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vblk.sock");
        let device = Arc::new(Tracked {
            inner: mem_raw(1 << 20),
            dirty: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
        });
        let mut opts = ExportOptions::default();
        opts.read_only = read_only;
        let export = Arc::new(Export::new(device.clone(), opts));
        let listener = Listener::unix(&sock).unwrap();
        let shutdown = Shutdown::new();
        let sd = shutdown.clone();
        let thread = std::thread::spawn(move || {
            serve_vhost_user_blk(export, &listener, VhostConfig::default(), &sd)
        });
        Vhost {
            sock,
            shutdown,
            device,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Triggers the shutdown and waits (bounded) for the server to return.
    fn stop(mut self) {
        self.shutdown.trigger();
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "vhost-user server did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap().unwrap();
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut m = request.to_le_bytes().to_vec();
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m
}

/// The server hangs up on `s` (end of file, or a reset) within the read timeout.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => {
                use std::io::ErrorKind::{TimedOut, WouldBlock};
                return !matches!(e.kind(), WouldBlock | TimedOut);
            }
        }
    }
}

/// A well-behaved frontend's first question: the device's virtio features.
fn features(sock: &Path) -> u64 {
    let mut s = connect(sock);
    s.write_all(&header(GET_FEATURES, VERSION_1, 0)).unwrap();
    let mut r = [0u8; 20];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r[..4], GET_FEATURES.to_le_bytes());
    assert_eq!(
        u32::from_le_bytes(r[4..8].try_into().unwrap()),
        VERSION_1 | REPLY
    );
    assert_eq!(r[8..12], 8u32.to_le_bytes());
    u64::from_le_bytes(r[12..20].try_into().unwrap())
}

#[test]
fn broken_frontends_end_only_their_session() {
    let srv = Vhost::start(false);
    let hostile: [Vec<u8>; 4] = [
        // An unknown request code.
        header(0xffff, VERSION_1, 0),
        // A payload size far beyond any message.
        header(GET_FEATURES, VERSION_1, u32::MAX),
        // A wrong protocol version.
        header(GET_FEATURES, 0x3, 0),
        // Sixteen bytes of noise.
        vec![0xa5; 16],
    ];
    for m in &hostile {
        let mut s = connect(&srv.sock);
        s.write_all(m).unwrap();
        assert!(closed(&mut s), "{m:?}");
    }
    // Half a header, then gone; a frontend that connects and leaves at once.
    let mut s = connect(&srv.sock);
    s.write_all(&[1, 0, 0]).unwrap();
    drop(s);
    drop(connect(&srv.sock));
    // The next frontend is served.
    let f = features(&srv.sock);
    assert_ne!(f & F_VERSION_1, 0, "{f:#x}");
    assert_eq!(f & F_RO, 0, "{f:#x}");
    assert_ne!(f & (F_DISCARD | F_WRITE_ZEROES), 0, "{f:#x}");
    let flushes = srv.device.flushes.load(Ordering::SeqCst);
    assert!(flushes > 0, "no flush after the frontends left");
    srv.stop();
}

#[test]
fn read_only_export_offers_ro_and_no_discard() {
    let srv = Vhost::start(true);
    let f = features(&srv.sock);
    assert_ne!(f & F_RO, 0, "{f:#x}");
    assert_eq!(f & (F_DISCARD | F_WRITE_ZEROES), 0, "{f:#x}");
    let device = srv.device.clone();
    srv.stop();
    assert!(
        !device.dirty.load(Ordering::SeqCst),
        "a read-only export was written"
    );
}
