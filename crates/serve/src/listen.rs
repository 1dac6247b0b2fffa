//! Sockets the servers listen on (TCP or unix), their connections, and [`Shutdown`],
//! the handle that stops a server cleanly from another thread or a signal handler.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown as HowShutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A listening socket: TCP (qemu-nbd `-b`/`-p`) or a unix socket (`-k`).
#[derive(Debug)]
pub struct Listener {
    kind: Kind,
    wake: Wake,
}

#[derive(Debug)]
enum Kind {
    Tcp(TcpListener),
    /// The path, if we bound it, is removed on drop.
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    /// Binds a TCP listener (`"127.0.0.1:10809"`; port 0 picks a free port).
    pub fn tcp(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let l = TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(Listener {
            kind: Kind::Tcp(l),
            wake: Wake::new()?,
        })
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
        // Bound under a temporary name and renamed into place once listening,
        // so the socket file appears only when a client can connect (a script
        // waiting for the file, or a test, never races bind(2) and listen(2)).
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let l = match UnixListener::bind(&tmp) {
            Ok(l) => {
                if let Err(e) = std::fs::rename(&tmp, path) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                l
            }
            // A temporary name past the 107-byte limit: bind in place.
            Err(_) => UnixListener::bind(path)?,
        };
        l.set_nonblocking(true)?;
        Ok(Listener {
            kind: Kind::Unix(l, Some(path.to_path_buf())),
            wake: Wake::new()?,
        })
    }

    /// How many sockets systemd socket activation passed to this process (0: not
    /// activated): `LISTEN_PID` is our pid and `LISTEN_FDS` a number, as qemu-nbd checks
    /// (`sd_listen_fds(3)`). Clients of libnbd start a server this way:
    /// `nbdinfo [ diskimg serve -f qcow2 disk.qcow2 ]`.
    pub fn activation_count() -> u32 {
        crate::activation::listen_fds()
    }

    /// The listening socket passed by socket activation as descriptor 3, unix or TCP
    /// (its address tells). Call it when [`Listener::activation_count`] is 1; an error
    /// if descriptor 3 is not a socket or was taken already. The socket's file, if
    /// any, belongs to whoever bound it and is left in place on drop.
    pub fn activated() -> io::Result<Self> {
        use crate::activation::{Activated, take_listener};
        let kind = match take_listener()? {
            Activated::Tcp(l) => {
                l.set_nonblocking(true)?;
                Kind::Tcp(l)
            }
            Activated::Unix(l) => {
                l.set_nonblocking(true)?;
                Kind::Unix(l, None)
            }
        };
        Ok(Listener {
            kind,
            wake: Wake::new()?,
        })
    }

    /// The TCP address bound (with the port picked), if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            Kind::Tcp(l) => l.local_addr().ok(),
            Kind::Unix(..) => None,
        }
    }

    /// The unix socket path, if a unix socket.
    pub fn path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Tcp(_) => None,
            Kind::Unix(_, p) => p.as_deref(),
        }
    }

    /// Waits for the next connection; `None` once the listener was woken for
    /// shutdown.
    pub fn accept(&self) -> io::Result<Option<Stream>> {
        loop {
            let ready = match &self.kind {
                Kind::Tcp(l) => self.wake.wait(l)?,
                Kind::Unix(l, _) => self.wake.wait(l)?,
            };
            if !ready {
                return Ok(None);
            }
            let r = match &self.kind {
                Kind::Tcp(l) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    Ok(Stream::Tcp(s))
                }),
                Kind::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(Stream::Unix(s))
                }),
            };
            match r {
                Ok(s) => return Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A unix listener sharing this socket, for servers that accept through another
    /// library (vhost-user).
    pub(crate) fn unix_clone(&self) -> io::Result<UnixListener> {
        match &self.kind {
            Kind::Unix(l, _) => {
                let c = l.try_clone()?;
                c.set_nonblocking(false)?;
                Ok(c)
            }
            Kind::Tcp(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "vhost-user needs a unix socket",
            )),
        }
    }

    /// Waits until a connection is pending (`true`) or the listener was woken.
    pub(crate) fn wait_pending(&self) -> io::Result<bool> {
        match &self.kind {
            Kind::Tcp(l) => self.wake.wait(l),
            Kind::Unix(l, _) => self.wake.wait(l),
        }
    }

    /// Makes [`Listener::accept`] return `None`, now and from then on.
    pub(crate) fn waker(&self) -> Box<dyn Fn() + Send + Sync> {
        let w = self.wake.tx.clone();
        Box::new(move || {
            let _ = rustix::io::write(&*w, &[1]);
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Kind::Unix(_, Some(path)) = &self.kind {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A pipe that wakes a thread waiting for a socket (written once, never drained).
#[derive(Debug)]
struct Wake {
    rx: OwnedFd,
    tx: Arc<OwnedFd>,
}

impl Wake {
    fn new() -> io::Result<Self> {
        let (rx, tx) = rustix::pipe::pipe()?;
        Ok(Wake {
            rx,
            tx: Arc::new(tx),
        })
    }

    /// Waits until `fd` is readable (`true`) or the pipe was written (`false`).
    fn wait(&self, fd: &impl AsFd) -> io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, poll};
        loop {
            let mut fds = [
                PollFd::new(fd, PollFlags::IN),
                PollFd::new(&self.rx, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let [sock, wake] = &fds;
            if !wake.revents().is_empty() {
                return Ok(false);
            }
            if !sock.revents().is_empty() {
                return Ok(true);
            }
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
