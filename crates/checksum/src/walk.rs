//! The parallel walk over a device: the calling thread plans chunks from
//! [`block_status`] and feeds the digest in order; worker threads read data chunks (and,
//! for blkhash, hash their blocks).
//!
//! Zero ranges (unallocated, zero clusters, holes) never reach a worker: the planner
//! adds them with [`Hasher::zero`]. At most `2 × workers` chunks are in flight, so
//! memory stays within that many chunk buffers whatever the image size.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use diskimg_blockio::{BlockDevice, Error, Result, block_status};

use crate::Options;
use crate::hasher::{Algorithm, BLOCK_SIZE, BlockDigest, Digest, Hasher, block_digest};

/// What one chunk contributes, in guest order.
enum Piece {
    /// This many zero bytes.
    Zero(u64),
    /// Block digests (blkhash) of this many bytes.
    Digests(Vec<BlockDigest>, u64),
    /// Plain bytes (sha256, blake3).
    Bytes(Vec<u8>),
}

/// A data chunk for a worker: (sequence number, guest offset, length).
type Job = (u64, u64, u64);

/// Spare chunk buffers handed back by the feeder.
type Spares = Arc<Mutex<Vec<Vec<u8>>>>;

struct Planner<'a> {
    dev: &'a dyn BlockDevice,
    chunk: u64,
    pos: u64,
    total: u64,
}

impl Planner<'_> {
    /// The next range: a zero run (block-aligned unless it ends the device) or a data
    /// chunk of at most `chunk` bytes.
    fn next(&mut self) -> Result<Option<(u64, u64, bool)>> {
        if self.pos >= self.total {
            return Ok(None);
        }
        let pos = self.pos;
        let rest = self.total - pos;
        let st = block_status(self.dev, pos, rest)?;
        let block = BLOCK_SIZE as u64;
        let zero_len = if st.length == rest {
            st.length
        } else {
            st.length / block * block
        };
        let (len, zero) = if st.zero && zero_len > 0 {
            (zero_len, true)
        } else {
            (self.chunk.min(rest), false)
        };
        self.pos += len;
        Ok(Some((pos, len, zero)))
    }
}

/// Reads one data chunk and turns it into its piece.
fn work(
    dev: &dyn BlockDevice,
    alg: Algorithm,
    spares: &Spares,
    off: u64,
    len: u64,
) -> Result<Piece> {
    let n = usize::try_from(len).map_err(|_| Error::invalid("chunk too large"))?;
    let mut buf = spares
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
        .unwrap_or_default();
    buf.resize(n, 0);
    dev.read_at(&mut buf, off)?;
    if alg != Algorithm::Blkhash {
        return Ok(Piece::Bytes(buf));
    }
    let digests = buf.chunks(BLOCK_SIZE).map(block_digest).collect();
    spares.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    Ok(Piece::Digests(digests, len))
}

/// Adds a finished piece to the digest, returning its buffer to the spares.
fn feed(h: &mut Hasher, piece: Piece, spares: &Spares) -> Result<u64> {
    Ok(match piece {
        Piece::Zero(n) => {
            h.zero(n);
            n
        }
        Piece::Digests(mds, n) => {
            if !h.add_block_digests(&mds, n) {
                return Err(Error::invalid("block digests off a block boundary"));
            }
            n
        }
        Piece::Bytes(b) => {
            h.update(&b);
            let n = b.len() as u64;
            spares.lock().unwrap_or_else(|p| p.into_inner()).push(b);
            n
        }
    })
}

/// Computes the digest of `dev`'s guest content (see [`crate::checksum`]).
pub(crate) fn run(
    dev: &dyn BlockDevice,
    opts: &Options,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Digest> {
    let total = dev.virtual_size();
    let block = BLOCK_SIZE as u64;
    let chunk = opts.chunk_size.max(block).next_multiple_of(block);
    let mut planner = Planner {
        dev,
        chunk,
        pos: 0,
        total,
    };
    let mut hasher = Hasher::new(opts.algorithm);
    let spares: Spares = Arc::default();
    let workers = opts.workers.clamp(1, 64);
    progress(0, total);
    if workers == 1 {
        while let Some((off, len, zero)) = planner.next()? {
            let piece = if zero {
                Piece::Zero(len)
            } else {
                work(dev, opts.algorithm, &spares, off, len)?
            };
            feed(&mut hasher, piece, &spares)?;
            progress(off + len, total);
        }
        return Ok(hasher.finalize());
    }
    let window = workers * 2;
    std::thread::scope(|scope| {
        let (job_tx, job_rx) = sync_channel::<Job>(window);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = sync_channel::<(u64, Result<Piece>)>(window);
        for _ in 0..workers {
            let (job_rx, res_tx, spares) = (job_rx.clone(), res_tx.clone(), spares.clone());
            let alg = opts.algorithm;
            scope.spawn(move || worker(dev, alg, &spares, &job_rx, &res_tx));
        }
        drop(res_tx);
        let mut feeder = Feeder {
            hasher: &mut hasher,
            spares: &spares,
            pending: BTreeMap::new(),
            next: 0,
            done: 0,
        };
        let r = feeder.drive(&mut planner, &job_tx, &res_rx, window, total, progress);
        drop(job_tx);
        // Let the workers finish (their sends must not block on a full channel).
        for _ in res_rx {}
        r
    })?;
    Ok(hasher.finalize())
}

fn worker(
    dev: &dyn BlockDevice,
    alg: Algorithm,
    spares: &Spares,
    jobs: &Mutex<Receiver<Job>>,
    results: &SyncSender<(u64, Result<Piece>)>,
) {
    loop {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((seq, off, len)) = job else { return };
        if results
            .send((seq, work(dev, alg, spares, off, len)))
            .is_err()
        {
            return;
        }
    }
}

/// The in-order side of the parallel walk.
struct Feeder<'a> {
    hasher: &'a mut Hasher,
    spares: &'a Spares,
    pending: BTreeMap<u64, Piece>,
    next: u64,
    done: u64,
}

impl Feeder<'_> {
    fn drive(
        &mut self,
        planner: &mut Planner<'_>,
        jobs: &SyncSender<Job>,
        results: &Receiver<(u64, Result<Piece>)>,
        window: usize,
        total: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let mut seq = 0u64;
        let mut in_flight = 0usize;
        let mut planned_all = false;
        loop {
            while !planned_all && in_flight < window && self.pending.len() < window {
                match planner.next()? {
                    None => planned_all = true,
                    Some((_, len, true)) => {
                        self.pending.insert(seq, Piece::Zero(len));
                        seq += 1;
                    }
                    Some((off, len, false)) => {
                        jobs.send((seq, off, len))
                            .map_err(|_| Error::invalid("checksum workers stopped"))?;
                        seq += 1;
                        in_flight += 1;
                    }
                }
            }
            while let Some(piece) = self.pending.remove(&self.next) {
                self.done += feed(self.hasher, piece, self.spares)?;
                self.next += 1;
                progress(self.done, total);
            }
            if in_flight == 0 {
                if planned_all {
                    return Ok(());
                }
                continue;
            }
            let (s, piece) = results
                .recv()
                .map_err(|_| Error::invalid("checksum workers stopped"))?;
            in_flight -= 1;
            self.pending.insert(s, piece?);
        }
    }
}
