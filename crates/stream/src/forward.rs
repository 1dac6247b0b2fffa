//! [`ForwardStorage`]: a read-only [`Storage`] over a byte stream that can only be read
//! front to back (a pipe, a decompressor, an HTTP body without range support).
//!
//! A producer thread reads the stream in 1 MiB chunks ahead of the consumers (so
//! decoding overlaps with whatever the consumers do), through a bounded channel. The
//! storage keeps the first [`HEAD_LIMIT`] bytes (image headers and, for images laid out
//! metadata-first, their tables) and the last [`WINDOW_LIMIT`] bytes before the furthest
//! position read (the chunks parallel readers are still working on). A read of bytes
//! already dropped fails with an error naming the input and the offset; reading ahead
//! skips the bytes in between. Memory is bounded by those limits whatever the stream's
//! length.
//!
//! The length is the declared one when the producer knows it (a tar member, an HTTP
//! `Content-Length`); otherwise [`PROVISIONAL_LEN`] until the end of the stream is
//! reached, then the real one, and bytes past the real end read as zeroes. [`Storage::
//! next_data`] reports a hole from the real end on, so sparse-aware copies skip the
//! provisional tail at once.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};

use diskimg_blockio::{Error, Result, Storage};

use crate::recycle::Recycler;
use crate::transport;

/// Bytes at the start of a stream kept for the whole pass.
pub const HEAD_LIMIT: u64 = 16 << 20;
/// Bytes kept behind the furthest position read.
pub const WINDOW_LIMIT: u64 = 48 << 20;
/// Chunks read ahead by the producer thread.
const CHUNKS_AHEAD: usize = 8;
/// Producer chunk size.
const CHUNK: usize = 1 << 20;
/// The length reported before the end of a stream of unknown length is reached.
pub const PROVISIONAL_LEN: u64 = 1 << 43;

struct State {
    rx: Option<Receiver<std::result::Result<Vec<u8>, String>>>,
    head: Vec<u8>,
    window: VecDeque<(u64, Vec<u8>)>,
    window_bytes: u64,
    /// Bytes received so far.
    pos: u64,
    eof: bool,
    failed: Option<String>,
    /// Bytes of the head kept (at most [`HEAD_LIMIT`]).
    head_limit: u64,
    /// Bytes kept behind the furthest position (at most [`WINDOW_LIMIT`]).
    window_limit: u64,
}

/// A read-only storage over a forward-only stream (see the module docs).
pub struct ForwardStorage {
    name: String,
    declared: Option<u64>,
    state: Mutex<State>,
    /// Chunks dropped from the window, for the producer to fill again.
    spare: Recycler,
}

impl std::fmt::Debug for ForwardStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardStorage")
            .field("name", &self.name)
            .field("declared", &self.declared)
            .finish_non_exhaustive()
    }
}

/// Reads `r` to the end in chunks, sending them; a read error ends the stream with
/// a message naming the offset.
fn produce(
    mut r: Box<dyn Read + Send>,
    tx: std::sync::mpsc::SyncSender<std::result::Result<Vec<u8>, String>>,
    spare: &Recycler,
) {
    let mut off = 0u64;
    loop {
        let mut buf = spare.take(CHUNK);
        let mut n = 0;
        while n < CHUNK {
            match r.read(buf.get_mut(n..).unwrap_or_default()) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let at = off + n as u64;
                    if n > 0 {
                        buf.truncate(n);
                        let _ = tx.send(Ok(buf));
                    }
                    let _ = tx.send(Err(format!("{e} (at offset {at} of the decoded data)")));
                    return;
                }
            }
        }
        if n == 0 {
            return;
        }
        buf.truncate(n);
        off += n as u64;
        if tx.send(Ok(buf)).is_err() {
            return;
        }
    }
}

impl ForwardStorage {
    /// Starts reading `reader` on a thread. `name` is used in errors; `declared` is
    /// the length when known (a shorter stream is then an error).
    pub fn new(
        name: impl Into<String>,
        reader: Box<dyn Read + Send>,
        declared: Option<u64>,
    ) -> Self {
        let (tx, rx) = sync_channel(CHUNKS_AHEAD);
        let spare = Recycler::new(CHUNKS_AHEAD);
        let theirs = spare.clone();
        std::thread::spawn(move || produce(reader, tx, &theirs));
        Self {
            spare,
            name: name.into(),
            declared,
            state: Mutex::new(State {
                rx: Some(rx),
                head: Vec::new(),
                window: VecDeque::new(),
                window_bytes: 0,
                pos: 0,
                eof: false,
                failed: None,
                head_limit: HEAD_LIMIT,
                window_limit: WINDOW_LIMIT,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads up to the end of the stream (dropping what is not kept) and returns its
    /// length: for verbs that need the length of a stream of unknown length.
    pub fn drain_to_end(&self) -> Result<u64> {
        let mut st = self.lock();
        while !st.eof {
            self.pull(&mut st)?;
        }
        Ok(st.pos)
    }

    /// Bytes received from the stream so far.
    pub fn position(&self) -> u64 {
        self.lock().pos
    }

    /// The real length, once known (declared, or the end was reached).
    pub fn known_len(&self) -> Option<u64> {
        let st = self.lock();
        if st.eof { Some(st.pos) } else { self.declared }
    }

    /// Keeps no more of the head than is held now: for a format that never reads its
    /// start again (raw), so the head's memory goes to nothing else.
    pub fn stop_growing_head(&self) {
        let mut st = self.lock();
        st.head_limit = st.head_limit.min(st.head.len() as u64);
    }

    /// A reader of the whole stream from its first byte, for a consumer that reads it
    /// once front to back (a stream-optimized VMDK walk): from now on the storage keeps
    /// no more head than it has and only a small window, so the bytes are not held twice.
    pub fn sequential(self: &Arc<Self>) -> ForwardReader {
        let mut st = self.lock();
        st.head_limit = st.head_limit.min(st.head.len() as u64);
        st.window_limit = 2 * CHUNK as u64;
        ForwardReader {
            storage: self.clone(),
            pos: 0,
        }
    }

    /// Receives one more chunk (or the end).
    fn pull(&self, st: &mut State) -> Result<()> {
        if let Some(e) = &st.failed {
            return Err(transport(format!("'{}'", self.name), e.clone()));
        }
        let msg = st.rx.as_ref().and_then(|rx| rx.recv().ok());
        match msg {
            None => {
                st.eof = true;
                st.rx = None;
                if let Some(d) = self.declared
                    && st.pos < d
                {
                    let e = format!("input ended at offset {} before its length {d}", st.pos);
                    st.failed = Some(e.clone());
                    return Err(transport(format!("'{}'", self.name), e));
                }
            }
            Some(Err(e)) => {
                st.failed = Some(e.clone());
                st.rx = None;
                return Err(transport(format!("'{}'", self.name), e));
            }
            Some(Ok(mut chunk)) => {
                let start = st.pos;
                st.pos += chunk.len() as u64;
                if start < st.head_limit {
                    let keep = usize::try_from(st.head_limit - start)
                        .unwrap_or(usize::MAX)
                        .min(chunk.len());
                    st.head
                        .extend_from_slice(chunk.get(..keep).unwrap_or_default());
                    chunk.drain(..keep);
                }
                if !chunk.is_empty() {
                    let off = st.pos - chunk.len() as u64;
                    st.window_bytes += chunk.len() as u64;
                    st.window.push_back((off, chunk));
                    while st.window_bytes > st.window_limit {
                        match st.window.pop_front() {
                            Some((_, c)) => {
                                st.window_bytes -= c.len() as u64;
                                self.spare.give(c);
                            }
                            None => break,
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies the kept bytes of `[off, off + buf.len())` (all received) into `buf`.
    fn copy_out(&self, st: &State, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let dst = buf.get_mut(done..).unwrap_or_default();
            let n = if at < st.head.len() as u64 {
                let src = st
                    .head
                    .get(usize::try_from(at).unwrap_or(usize::MAX)..)
                    .unwrap_or_default();
                let n = src.len().min(dst.len());
                dst.get_mut(..n)
                    .unwrap_or_default()
                    .copy_from_slice(src.get(..n).unwrap_or_default());
                n
            } else if at >= st.pos {
                // Past the end of a stream of unknown length: zeroes.
                dst.fill(0);
                dst.len()
            } else {
                let chunk = st
                    .window
                    .iter()
                    .find(|(o, c)| at >= *o && at < o + c.len() as u64);
                let Some((o, c)) = chunk else {
                    return Err(Error::invalid(format!(
                        "'{}': offset {at} was already passed: this input can only be read front to back (the first {} MiB and the last {} MiB read are kept); save it to a file or use a seekable source",
                        self.name,
                        HEAD_LIMIT >> 20,
                        WINDOW_LIMIT >> 20
                    )));
                };
                let src = c
                    .get(usize::try_from(at - o).unwrap_or(usize::MAX)..)
                    .unwrap_or_default();
                let n = src.len().min(dst.len());
                dst.get_mut(..n)
                    .unwrap_or_default()
                    .copy_from_slice(src.get(..n).unwrap_or_default());
                n
            };
            if n == 0 {
                return Err(Error::internal("forward storage made no progress"));
            }
            done += n;
        }
        Ok(())
    }
}

impl Storage for ForwardStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(Error::invalid("read beyond the end"))?;
        let mut st = self.lock();
        while st.pos < end && !st.eof {
            self.pull(&mut st)?;
        }
        if let Some(e) = &st.failed {
            return Err(transport(format!("'{}'", self.name), e.clone()));
        }
        if st.eof && end > st.pos && self.declared.is_some() {
            return Err(Error::invalid(format!(
                "'{}': read of {} bytes at offset {offset} past the end of the input ({} bytes)",
                self.name,
                buf.len(),
                st.pos
            )));
        }
        self.copy_out(&st, buf, offset)
    }

    diskimg_blockio::read_only_storage!();

    fn len(&self) -> Result<u64> {
        Ok(self.known_len().unwrap_or(PROVISIONAL_LEN))
    }

    fn next_data(&self, offset: u64) -> Result<Option<u64>> {
        let len = self.len()?;
        Ok((offset < len).then_some(offset))
    }

    fn next_hole(&self, offset: u64) -> Result<u64> {
        Ok(self.len()?.max(offset))
    }
}

/// A [`Read`] of a [`ForwardStorage`] from its first byte to the end of the stream
/// ([`ForwardStorage::sequential`]); a stream shorter than its declared length fails.
pub struct ForwardReader {
    storage: Arc<ForwardStorage>,
    pos: u64,
}

impl Read for ForwardReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let f = &self.storage;
        let mut st = f.lock();
        while st.pos <= self.pos && !st.eof {
            f.pull(&mut st)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let avail = st.pos.saturating_sub(self.pos);
        let n = usize::try_from(avail.min(buf.len() as u64)).unwrap_or(0);
        if n == 0 {
            return Ok(0);
        }
        let dst = buf.get_mut(..n).unwrap_or_default();
        f.copy_out(&st, dst, self.pos)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A [`Read`] over a storage from offset 0 to `len`, for decoding a seekable file or
/// URL as a stream.
pub struct StorageReader {
    storage: Arc<dyn Storage>,
    pos: u64,
    len: u64,
}

impl StorageReader {
    /// Reads `storage` from the start to `len`.
    pub fn new(storage: Arc<dyn Storage>, len: u64) -> Self {
        Self {
            storage,
            pos: 0,
            len,
        }
    }
}

impl Read for StorageReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n =
            usize::try_from((self.len - self.pos).min(buf.len() as u64).min(4 << 20)).unwrap_or(0);
        if n == 0 {
            return Ok(0);
        }
        let dst = buf.get_mut(..n).unwrap_or_default();
        self.storage
            .read_exact_at(dst, self.pos)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}
