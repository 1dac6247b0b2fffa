//! Sockets the servers listen on (TCP or unix), their connections, and [`Shutdown`],
//! the handle that stops a server cleanly from another thread or a signal handler.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown as HowShutdown, SocketAddr, TcpListener};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A listening socket: TCP (qemu-nbd `-b`/`-p`) or a unix socket (`-k`).
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A unix-domain listener and the path it is bound to (removed on drop).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a TCP listener (`"127.0.0.1:10809"`; port 0 picks a free port).
    pub fn tcp(addr: impl ToSocketAddrs) -> io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Binds a unix socket at `path`, replacing a stale socket file left there.
    pub fn unix(path: impl AsRef<Path>) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let path = path.as_ref();
        if let Ok(m) = std::fs::symlink_metadata(path)
            && m.file_type().is_socket()
        {
            std::fs::remove_file(path)?;
        }
        Ok(Listener::Unix(
            UnixListener::bind(path)?,
            path.to_path_buf(),
        ))
    }

    /// The TCP address bound (with the port picked), if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    /// Connects to the listener once, so that a thread blocked in [`Listener::accept`]
    /// returns (used on shutdown).
    pub(crate) fn waker(&self) -> Box<dyn Fn() + Send + Sync> {
        match self {
            Listener::Tcp(l) => {
                let addr = l.local_addr().ok().map(|mut a| {
                    if a.ip().is_unspecified() {
                        a.set_ip(match a.ip() {
                            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                        });
                    }
                    a
                });
                Box::new(move || {
                    if let Some(a) = addr {
                        let _ = TcpStream::connect_timeout(&a, Duration::from_secs(1));
                    }
                })
            }
            Listener::Unix(_, path) => {
                let path = path.clone();
                Box::new(move || {
                    let _ = UnixStream::connect(&path);
                })
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Another handle to the same connection.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shuts down the read side, the write side, or both.
    pub fn shutdown(&self, how: HowShutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }

    /// Sets (or clears) the timeout of each read.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Waker = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct ShutdownInner {
    triggered: AtomicBool,
    next_id: AtomicU64,
    wakers: Mutex<HashMap<u64, Waker>>,
}

/// Stops a server: [`Shutdown::trigger`] makes `serve` stop accepting, lets requests in
/// flight finish, closes the connections, flushes the export and return. Clone it
/// freely; every clone is the same switch.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<ShutdownInner>);

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl Shutdown {
    /// A switch that has not been triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown (idempotent).
    pub fn trigger(&self) {
        if self.0.triggered.swap(true, Ordering::SeqCst) {
            return;
        }
        let wakers: Vec<Waker> = self
            .0
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in wakers {
            w();
        }
    }

    /// Whether [`Shutdown::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.0.triggered.load(Ordering::SeqCst)
    }

    /// Runs `f` on trigger (at once if already triggered). Returns a key for
    /// [`Shutdown::forget`].
    pub(crate) fn on_trigger(&self, f: Waker) -> u64 {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let mut w = self.0.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_triggered() {
            drop(w);
            f();
        } else {
            w.insert(id, f);
        }
        id
    }

    /// Drops the action registered under `id`.
    pub(crate) fn forget(&self, id: u64) {
        self.0
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}
