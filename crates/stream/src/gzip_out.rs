//! [`ParallelGzip`]: a gzip writer that deflates on several threads, as pigz does.
//!
//! The input is cut into 1 MiB pieces; each is deflated on its own (a raw deflate
//! stream ended by a sync flush, so the next piece starts on a byte boundary; the last
//! one ends the stream) and the pieces are written one after the other between one gzip
//! header and one trailer (CRC-32 combined from the pieces' CRCs, length mod 2^32). The
//! result is a single ordinary gzip member. Pieces go round-robin to the threads and
//! come back in the same order, so memory stays at two pieces per thread.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Bytes per piece.
const PIECE: usize = 1 << 20;

type Done = std::io::Result<(Vec<u8>, crc32fast::Hasher, u64)>;

struct Worker {
    tx: Option<SyncSender<(Vec<u8>, bool)>>,
    rx: Option<Receiver<Done>>,
    handle: Option<JoinHandle<()>>,
}

fn deflate_piece(data: &[u8], last: bool, level: u32) -> Done {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
    enc.write_all(data)?;
    let out = if last {
        enc.finish()?
    } else {
        enc.flush()?;
        std::mem::take(enc.get_mut())
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(data);
    Ok((out, crc, data.len() as u64))
}

/// A gzip writer deflating on several threads (see the module docs). Call
/// [`ParallelGzip::finish`] to end the stream; dropped without it, the output lacks
/// its trailer (and is refused by `gzip -t`).
pub struct ParallelGzip<W: Write> {
    out: Option<W>,
    buf: Vec<u8>,
    workers: Vec<Worker>,
    sent: usize,
    received: usize,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> ParallelGzip<W> {
    /// Starts a gzip stream on `out` (compression `level` 0–9, `threads` deflaters).
    pub fn new(mut out: W, level: u32, threads: usize) -> std::io::Result<Self> {
        // Magic, deflate, no flags, no mtime, no extra flags, OS unix.
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])?;
        let level = level.min(9);
        let workers = (0..threads.clamp(1, 16))
            .map(|_| {
                let (tx, wrx) = sync_channel::<(Vec<u8>, bool)>(1);
                let (dtx, rx) = sync_channel::<Done>(1);
                let handle = std::thread::spawn(move || {
                    for (data, last) in wrx {
                        if dtx.send(deflate_piece(&data, last, level)).is_err() {
                            return;
                        }
                    }
                });
                Worker {
                    tx: Some(tx),
                    rx: Some(rx),
                    handle: Some(handle),
                }
            })
            .collect();
        Ok(Self {
            out: Some(out),
            buf: Vec::new(),
            workers,
            sent: 0,
            received: 0,
            crc: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    /// Writes out the oldest piece in flight.
    fn receive(&mut self) -> std::io::Result<()> {
        let k = self.workers.len();
        let rx = self
            .workers
            .get(self.received % k)
            .and_then(|w| w.rx.as_ref())
            .ok_or_else(|| std::io::Error::other("no deflate thread"))?;
        let (z, crc, n) = rx
            .recv()
            .map_err(|_| std::io::Error::other("deflate thread failed"))??;
        self.output()?.write_all(&z)?;
        self.crc.combine(&crc);
        self.len += n;
        self.received += 1;
        Ok(())
    }

    /// Hands the buffered piece to the next thread (`last`: it ends the stream).
    fn send(&mut self, last: bool) -> std::io::Result<()> {
        let k = self.workers.len();
        if self.sent - self.received >= k {
            self.receive()?;
        }
        let data = std::mem::take(&mut self.buf);
        let tx = self
            .workers
            .get(self.sent % k)
            .and_then(|w| w.tx.as_ref())
            .ok_or_else(|| std::io::Error::other("no deflate thread"))?;
        tx.send((data, last))
            .map_err(|_| std::io::Error::other("deflate thread failed"))?;
        self.sent += 1;
        Ok(())
    }

    /// Ends the stream (last piece, trailer) and returns the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.send(true)?;
        while self.received < self.sent {
            self.receive()?;
        }
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
        // ISIZE: the input length modulo 2^32 (RFC 1952).
        let isize = u32::try_from(self.len % (1 << 32)).unwrap_or(0);
        let out = self.output()?;
        out.write_all(&crc.to_le_bytes())?;
        out.write_all(&isize.to_le_bytes())?;
        out.flush()?;
        self.stop();
        self.out
            .take()
            .ok_or_else(|| std::io::Error::other("gzip output gone"))
    }

    fn output(&mut self) -> std::io::Result<&mut W> {
        self.out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("gzip output gone"))
    }

    /// Stops the threads (a send or receive still pending fails, so none blocks).
    fn stop(&mut self) {
        for w in &mut self.workers {
            w.tx = None;
            w.rx = None;
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PIECE - self.buf.len());
        self.buf
            .extend_from_slice(data.get(..n).unwrap_or_default());
        if self.buf.len() == PIECE {
            self.send(false)?;
        }
        Ok(n)
    }

    /// Pieces are only complete at [`ParallelGzip::finish`]; this flushes nothing.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        self.stop();
    }
}
