//! The transmission phase: requests read, checked and executed, replies written.
//!
//! Each connection is served by a small team of threads in leader/follower style: the
//! thread holding the reader lock reads the next request (header and payload), releases
//! the lock and executes the request while another thread reads the next one. With one
//! request in flight a single thread does everything (no hand-off latency); a new
//! thread joins when every thread is busy, up to [`NbdConfig::workers`].

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown as How;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::proto::*;
use super::status::block_status_reply;
use super::{NbdConfig, Session};
use crate::export::{Export, Fault};
use crate::listen::Stream;

/// One request header (`NBD_REQUEST_MAGIC`, 28 bytes, or with extended headers
/// `NBD_EXTENDED_REQUEST_MAGIC`, 32 bytes with a 64-bit length).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request {
    pub(crate) flags: u16,
    pub(crate) ty: u16,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    /// The effect length, or a write's payload length.
    pub(crate) len: u64,
}

/// A connection in transmission.
pub(crate) struct Conn {
    pub(crate) export: Arc<Export>,
    pub(crate) session: Session,
    reader: Mutex<BufReader<Stream>>,
    writer: Mutex<Stream>,
    control: Stream,
    closing: AtomicBool,
    /// Threads waiting for (or holding) the reader lock.
    waiting: AtomicUsize,
    workers: AtomicUsize,
    max_workers: usize,
    spawned: Mutex<Vec<JoinHandle<()>>>,
}

/// A worker keeps its read buffer up to this size between requests.
const KEEP_BUFFER: usize = 4 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What reading the next request gave.
enum Next {
    /// A request to execute (a write's payload is in the buffer).
    Run(Request),
    /// A request to answer with this error (its payload, if any, was consumed).
    Fail(Request, Fault),
    /// Disconnect: `NBD_CMD_DISC`, end of stream, or a protocol violation after which
    /// the stream cannot be trusted (wrong magic, oversized write). `Some` is a last
    /// error reply to send first.
    Close(Option<(Request, Fault)>),
}

impl Conn {
    pub(crate) fn new(
        stream: Stream,
        export: Arc<Export>,
        session: Session,
        config: &NbdConfig,
    ) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Conn {
            export,
            session,
            writer: Mutex::new(stream.try_clone()?),
            control: stream.try_clone()?,
            reader: Mutex::new(BufReader::with_capacity(64 << 10, stream)),
            closing: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            workers: AtomicUsize::new(1),
            max_workers: config.workers.max(1),
            spawned: Mutex::new(Vec::new()),
        }))
    }

    /// Stops reading requests: in-flight ones still complete and reply.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.control.shutdown(How::Read);
    }

    /// Serves the connection on this thread (and helpers it spawns) until it closes.
    /// Returns (or unwinds, if a request panicked here) only once every helper ended
    /// and the connection is shut down.
    pub(crate) fn run(self: &Arc<Self>) {
        let _end = End(self);
        self.worker();
    }

    /// Waits for every helper to end, then shuts the connection down.
    fn end(&self) {
        loop {
            let handles: Vec<_> = lock(&self.spawned).drain(..).collect();
            if handles.is_empty() {
                break;
            }
            for h in handles {
                let _ = h.join();
            }
        }
        self.control.shutdown(How::Both);
    }

    fn worker(self: &Arc<Self>) {
        // A request that panics leaves the client without its reply: stop reading
        // requests, let the others finish, and close, so the client sees the end of
        // the stream instead of waiting for that reply forever.
        let _close = CloseOnPanic(self);
        let mut payload = Vec::new();
        let mut out = Vec::new();
        let mut data = Vec::new();
        loop {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let next = {
                let mut r = lock(&self.reader);
                if self.closing.load(Ordering::SeqCst) {
                    Next::Close(None)
                } else {
                    read_request(&mut *r, &mut payload, self.session.extended)
                        .unwrap_or(Next::Close(None))
                }
            };
            let idle = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
            let req = match next {
                Next::Run(req) => req,
                Next::Fail(req, f) => {
                    self.error_reply(&req, f, &mut out);
                    if self.send(&out).is_err() {
                        self.close();
                        break;
                    }
                    continue;
                }
                Next::Close(last) => {
                    self.close();
                    if let Some((req, f)) = last {
                        self.error_reply(&req, f, &mut out);
                        let _ = self.send(&out);
                    }
                    break;
                }
            };
            if idle == 0 {
                self.grow();
            }
            let n = self.execute(&req, &payload, &mut out, &mut data);
            let tail = data.get(..n).unwrap_or(&[]);
            if !out.is_empty() && self.send_parts(&out, tail).is_err() {
                self.close();
                break;
            }
            if data.len() > KEEP_BUFFER {
                data = Vec::new();
            }
        }
    }

    /// Adds a worker when all are busy and the team may grow.
    fn grow(self: &Arc<Self>) {
        let n = self.workers.load(Ordering::SeqCst);
        if n >= self.max_workers || self.closing.load(Ordering::SeqCst) {
            return;
        }
        self.workers.fetch_add(1, Ordering::SeqCst);
        let me = Arc::clone(self);
        match std::thread::Builder::new()
            .name("nbd-worker".into())
            .spawn(move || me.worker())
        {
            Ok(h) => lock(&self.spawned).push(h),
            Err(_) => {
                self.workers.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        lock(&self.writer).write_all(msg)
    }

    /// Sends `head` then `tail` as one reply (vectored, no copy of the data).
    fn send_parts(&self, head: &[u8], tail: &[u8]) -> io::Result<()> {
        let mut w = lock(&self.writer);
        let mut bufs = [io::IoSlice::new(head), io::IoSlice::new(tail)];
        let mut slices: &mut [io::IoSlice<'_>] = &mut bufs;
        while !slices.is_empty() {
            match w.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Executes `req`: the reply's header (or all of it) goes into `out` (empty: no
    /// reply), and the returned count of bytes of `data` follow it (read data).
    fn execute(
        &self,
        req: &Request,
        payload: &[u8],
        out: &mut Vec<u8>,
        data: &mut Vec<u8>,
    ) -> usize {
        out.clear();
        let r = if req.ty == CMD_READ {
            self.read(req, out, data)
        } else {
            self.run_command(req, payload, out).map(|()| 0)
        };
        match r {
            Ok(n) => {
                if out.is_empty() {
                    self.ok_reply(req, out);
                }
                n
            }
            Err(f) => {
                self.error_reply(req, f, out);
                0
            }
        }
    }

    /// A success without payload: a simple reply, or with extended headers (which allow
    /// no simple replies) a `NONE` chunk.
    fn ok_reply(&self, req: &Request, out: &mut Vec<u8>) {
        if self.session.extended {
            let f = self.framing(req);
            chunk_header(out, f, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
        } else {
            simple_reply(out, req.cookie, 0);
        }
    }

    /// How this connection frames the replies to `req`.
    fn framing(&self, req: &Request) -> Framing {
        Framing {
            extended: self.session.extended,
            offset: req.offset,
        }
    }

    fn error_reply(&self, req: &Request, f: Fault, out: &mut Vec<u8>) {
        out.clear();
        if self.session.structured {
            let msg = fault_message(f).as_bytes();
            chunk_header(
                out,
                self.framing(req),
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                6 + msg.len(),
            );
            out.put32(f.nbd_code());
            out.put16(u16::try_from(msg.len()).unwrap_or(0));
            out.extend_from_slice(msg);
        } else {
            simple_reply(out, req.cookie, f.nbd_code());
        }
    }

    fn run_command(&self, req: &Request, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Fault> {
        let e = &self.export;
        let flags_ok = |allowed: u16| req.flags & !(allowed | CMD_FLAG_FUA) == 0;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let (off, len) = (req.offset, req.len);
        match req.ty {
            CMD_WRITE if flags_ok(0) => e.write(payload, off, fua),
            CMD_FLUSH if flags_ok(0) => {
                if off != 0 || len != 0 {
                    return Err(Fault::Inval);
                }
                e.flush()
            }
            CMD_TRIM if flags_ok(0) => e.trim(off, len, fua),
            CMD_CACHE if flags_ok(0) => e.check(off, len),
            CMD_WRITE_ZEROES if flags_ok(CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) => {
                let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
                let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
                e.write_zeroes(off, len, no_hole, fast, fua)
            }
            CMD_BLOCK_STATUS if flags_ok(CMD_FLAG_REQ_ONE) => {
                if self.session.contexts.is_empty() {
                    return Err(Fault::Inval);
                }
                let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                let f = self.framing(req);
                let contexts = &self.session.contexts;
                block_status_reply(e, contexts, (f, req.cookie), off, len, one, out)
            }
            _ => Err(Fault::Inval),
        }
    }

    /// `NBD_CMD_READ`: the reply header into `out`, the data into `data` (grown, never
    /// shrunk, so it is not zeroed again for every request); returns the data length.
    fn read(&self, req: &Request, out: &mut Vec<u8>, data: &mut Vec<u8>) -> Result<usize, Fault> {
        let allowed = CMD_FLAG_FUA
            | if self.session.structured {
                CMD_FLAG_DF
            } else {
                0
            };
        if req.flags & !allowed != 0 {
            return Err(Fault::Inval);
        }
        let len = usize::try_from(req.len).map_err(|_| Fault::Inval)?;
        if req.len > u64::from(MAX_PAYLOAD) {
            return Err(if self.session.structured {
                Fault::Overflow
            } else {
                Fault::Inval
            });
        }
        self.export.check(req.offset, req.len)?;
        let f = self.framing(req);
        if self.session.structured && len == 0 {
            chunk_header(out, f, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
            return Ok(0);
        }
        if data.len() < len {
            data.resize(len, 0);
        }
        let buf = data.get_mut(..len).ok_or(Fault::Io)?;
        self.export.read(buf, req.offset)?;
        if self.session.structured {
            chunk_header(
                out,
                f,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + len,
            );
            out.put64(req.offset);
        } else {
            simple_reply(out, req.cookie, 0);
        }
        Ok(len)
    }
}

/// Ends the connection when [`Conn::run`] returns or unwinds.
struct End<'a>(&'a Conn);

impl Drop for End<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Closes the connection if the worker holding it unwinds.
struct CloseOnPanic<'a>(&'a Conn);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.close();
        }
    }
}

/// Reads one request (28 bytes, or 32 with `extended` headers); a write's payload goes
/// into `payload`.
fn read_request<R: Read>(r: &mut R, payload: &mut Vec<u8>, extended: bool) -> io::Result<Next> {
    let mut h = [0u8; 32];
    let (size, magic) = if extended {
        (32, EXTENDED_REQUEST_MAGIC)
    } else {
        (28, REQUEST_MAGIC)
    };
    r.read_exact(h.get_mut(..size).unwrap_or_default())?;
    if u32::from_be_bytes(be(&h, 0)) != magic {
        return Ok(Next::Close(None));
    }
    let mut req = Request {
        flags: u16::from_be_bytes(be(&h, 4)),
        ty: u16::from_be_bytes(be(&h, 6)),
        cookie: u64::from_be_bytes(be(&h, 8)),
        offset: u64::from_be_bytes(be(&h, 16)),
        len: if extended {
            u64::from_be_bytes(be(&h, 24))
        } else {
            u64::from(u32::from_be_bytes(be(&h, 24)))
        },
    };
    payload.clear();
    // What follows the header: a write's data, and with extended headers whatever
    // `NBD_CMD_FLAG_PAYLOAD_LEN` announces. The extension says a write announces its
    // data too; qemu's client (10.0) sends it without the flag, as qemu-nbd accepts.
    let announced = extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    if req.ty == CMD_DISC {
        return Ok(Next::Close(None));
    }
    if req.ty != CMD_WRITE && !announced {
        return Ok(Next::Run(req));
    }
    if req.len > u64::from(MAX_PAYLOAD) {
        // The payload cannot be accepted, and the stream would be out of step if it
        // were skipped: answer and disconnect (the spec allows it for such sizes).
        return Ok(Next::Close(Some((req, Fault::Inval))));
    }
    payload.resize(usize::try_from(req.len).unwrap_or(0), 0);
    r.read_exact(payload)?;
    req.flags &= !CMD_FLAG_PAYLOAD_LEN;
    if req.ty != CMD_WRITE {
        // No other command takes a payload here (block status's payload form is not
        // offered): consumed, and refused.
        return Ok(Next::Fail(req, Fault::Inval));
    }
    Ok(Next::Run(req))
}

fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.put32(SIMPLE_REPLY_MAGIC);
    out.put32(error);
    out.put64(cookie);
}

fn fault_message(f: Fault) -> &'static str {
    match f {
        Fault::Perm => "export is read-only",
        Fault::Io => "I/O error",
        Fault::Inval => "invalid request (range, length or flags)",
        Fault::NoSpc => "write beyond the end of the export",
        Fault::Overflow => "request too large",
        Fault::NotSup => "cannot zero this range quickly",
        Fault::Shutdown => "server is shutting down",
    }
}
