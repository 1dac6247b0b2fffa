//! The NBD server: fixed newstyle negotiation, structured replies, metadata contexts,
//! and a connection per client served by a small team of threads.
//!
//! [`NbdServer::serve`] accepts clients on a [`Listener`] until its [`Shutdown`] is
//! triggered (or, without [`NbdConfig::persistent`], until the last client leaves, as
//! qemu-nbd does), then lets requests in flight finish, closes every connection and
//! flushes the export.

mod handshake;
mod proto;
mod status;
mod transmit;

use std::io;
use std::net::Shutdown as How;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::export::Export;
use crate::listen::{Listener, Shutdown, Stream};
use status::Context;

/// What a connection negotiated.
#[derive(Clone, Debug, Default)]
pub(crate) struct Session {
    /// Replies may be chunks (structured replies or extended headers).
    pub(crate) structured: bool,
    /// Extended headers: 32-byte requests and extended reply chunks only.
    pub(crate) extended: bool,
    pub(crate) no_zeroes: bool,
    pub(crate) contexts: Vec<Context>,
    /// Transmission flags sent to the client.
    pub(crate) flags: u16,
}

/// How the server treats connections.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NbdConfig {
    /// Most clients connected at once (qemu-nbd `-e`, default 1; 0 = no limit). More
    /// connections wait in the listen backlog until one leaves.
    pub max_connections: usize,
    /// Keep serving after the last client leaves (qemu-nbd `-t`).
    pub persistent: bool,
    /// A client must finish negotiating within this time (qemu-nbd `--handshake-limit`).
    pub handshake_limit: Duration,
    /// Most threads serving one connection's requests in parallel.
    pub workers: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            max_connections: 1,
            persistent: false,
            handshake_limit: Duration::from_secs(10),
            workers: 8,
        }
    }
}

impl NbdConfig {
    /// Whether `NBD_FLAG_CAN_MULTI_CONN` is advertised: every connection shares the one
    /// device (no per-connection cache), so a flush covers every connection's writes;
    /// advertised when more than one connection is allowed.
    pub(crate) fn multi_conn(&self) -> bool {
        self.max_connections != 1
    }
}

/// Serves one [`Export`] over NBD.
#[derive(Debug, Clone)]
pub struct NbdServer {
    export: Arc<Export>,
    config: NbdConfig,
}

/// Connections currently open.
#[derive(Default)]
struct Active {
    count: Mutex<usize>,
    changed: Condvar,
}

impl Active {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One open connection in [`Active`]'s count, for as long as it lives: dropped when its
/// thread ends, however it ends (a panic in a request included, or a thread that could
/// not be started), it takes the connection off the count, wakes `serve` and the accept
/// loop, and ends a non-persistent server after its last client. Done by hand after the
/// connection returned, a panic would skip it and `serve` would wait forever, holding
/// the image (and its lock) unflushed.
struct Counted {
    active: Arc<Active>,
    shutdown: Shutdown,
    persistent: bool,
}

impl Counted {
    fn new(active: &Arc<Active>, shutdown: &Shutdown, persistent: bool) -> Self {
        *active.lock() += 1;
        Counted {
            active: active.clone(),
            shutdown: shutdown.clone(),
            persistent,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut n = self.active.lock();
        *n = n.saturating_sub(1);
        let last = *n == 0;
        // Always: `serve` may wait for this count after a trigger (a signal) already
        // ran, so triggering again would wake nobody.
        self.active.changed.notify_all();
        drop(n);
        if last && !self.persistent {
            self.shutdown.trigger();
        }
    }
}

/// Forgets a [`Shutdown`] action when dropped (a panic included).
struct Forget<'a>(&'a Shutdown, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

impl NbdServer {
    /// A server for `export` with `config`.
    pub fn new(export: Arc<Export>, config: NbdConfig) -> Self {
        Self { export, config }
    }

    /// The export served.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// Accepts and serves clients until `shutdown` is triggered (or the last client
    /// leaves, unless persistent); then waits for every connection to finish its
    /// requests and flushes the export. Errors are the listener's or the final flush's.
    pub fn serve(&self, listener: &Listener, shutdown: &Shutdown) -> io::Result<()> {
        let active = Arc::new(Active::default());
        let wake_listener = shutdown.on_trigger(listener.waker());
        let a = active.clone();
        let wake_waiters = shutdown.on_trigger(Box::new(move || {
            let _g = a.lock();
            a.changed.notify_all();
        }));
        let result = self.accept_loop(listener, shutdown, &active);
        shutdown.trigger();
        shutdown.forget(wake_listener);
        shutdown.forget(wake_waiters);
        let mut n = active.lock();
        while *n > 0 {
            n = active.changed.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        drop(n);
        let flushed = self
            .export
            .flush()
            .map_err(|f| io::Error::other(format!("final flush failed: {f:?}")));
        result.and(flushed)
    }

    fn accept_loop(
        &self,
        listener: &Listener,
        shutdown: &Shutdown,
        active: &Arc<Active>,
    ) -> io::Result<()> {
        loop {
            {
                let mut n = active.lock();
                let max = self.config.max_connections;
                while max > 0 && *n >= max && !shutdown.is_triggered() {
                    n = active.changed.wait(n).unwrap_or_else(|e| e.into_inner());
                }
            }
            if shutdown.is_triggered() {
                return Ok(());
            }
            let stream = match listener.accept() {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(()),
                Err(e) if transient(&e) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if shutdown.is_triggered() {
                return Ok(());
            }
            let counted = Counted::new(active, shutdown, self.config.persistent);
            let (server, sd) = (self.clone(), shutdown.clone());
            // A thread that cannot start drops the closure, and `counted` with it.
            let _ = std::thread::Builder::new()
                .name("nbd-conn".into())
                .spawn(move || {
                    let _counted = counted;
                    server.connection(stream, &sd);
                });
        }
    }

    /// Negotiates and serves one client.
    fn connection(&self, stream: Stream, shutdown: &Shutdown) {
        let Ok(control) = stream.try_clone() else {
            return;
        };
        let key = shutdown.on_trigger(Box::new(move || control.shutdown(How::Read)));
        let _forget = Forget(shutdown, key);
        let _ = self.negotiate_and_serve(stream, shutdown);
    }

    fn negotiate_and_serve(&self, mut stream: Stream, shutdown: &Shutdown) -> io::Result<()> {
        stream.set_read_timeout(Some(self.config.handshake_limit))?;
        let outcome = handshake::negotiate(&mut stream, &self.export, &self.config, shutdown)?;
        let handshake::Outcome::Transmit(session) = outcome else {
            stream.shutdown(How::Both);
            return Ok(());
        };
        stream.set_read_timeout(None)?;
        let conn = transmit::Conn::new(stream, self.export.clone(), session, &self.config)?;
        conn.run();
        Ok(())
    }
}

/// Accept errors worth retrying (out of descriptors, an aborted connection).
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}
