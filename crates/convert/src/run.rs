//! Driving the chunks: sequentially, or with worker threads writing in order or
//! out of order.
//!
//! Chunks are claimed from a shared cursor. A chunk is normally
//! [`Ctx::chunk`](crate::plan::Ctx) bytes (aligned to multiples of it), but when the source reads as zeroes for
//! longer than that (a hole, unallocated clusters) and nothing needs a buffer for it (no
//! `-S 0`, no `-B` comparison), the whole zero range is claimed at once: a sparse
//! terabyte costs a few block-status calls, not one per 2 MiB.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, mpsc};

use diskimg_blockio::{BlockDevice, Error, Result, block_status};

use crate::options::ConvertStats;
use crate::plan::{Ctx, Op, apply};

/// Bytes of chunks the workers may plan ahead of the ordered writer (at least one chunk
/// per worker). 16 MiB was no faster for compressed targets (512 KiB chunks with -m 8)
/// and raised a streamOptimized conversion's peak RSS from 45 to 60-70 MB.
const READ_AHEAD: u64 = 4 << 20;

enum Msg {
    /// A planned chunk (index, length) for the ordered writer.
    Planned(u64, u64, Vec<Op>),
    /// A chunk of this length a worker already wrote.
    Written(u64, ConvertStats),
    Failed(Error),
}

/// Ordered mode: how many chunks the writer has written; workers wait (without
/// spinning) until their chunk is within the window.
struct Gate {
    written: Mutex<u64>,
    cv: Condvar,
}

impl Gate {
    fn wait_below(&self, idx: u64, window: u64, abort: &AtomicBool) {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        while idx >= w.saturating_add(window) && !abort.load(Ordering::Relaxed) {
            w = self.cv.wait(w).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn advance(&self, written: u64) {
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = written;
        self.cv.notify_all();
    }

    fn abort(&self, abort: &AtomicBool) {
        // Under the lock, so a worker between its check and its wait cannot miss it.
        let _w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        abort.store(true, Ordering::Relaxed);
        self.cv.notify_all();
    }
}

/// The next chunk to claim: (index, guest offset).
struct Cursor {
    idx: u64,
    pos: u64,
}

/// Claims the next chunk: `(index, offset, length)`, or `None` at the end.
fn claim(ctx: &Ctx<'_>, cur: &Mutex<Cursor>, total: u64) -> Result<Option<(u64, u64, u64)>> {
    let mut c = cur.lock().unwrap_or_else(|p| p.into_inner());
    if c.pos >= total {
        return Ok(None);
    }
    let pos = c.pos;
    // Chunks end on the grid of `ctx.chunk` (a multiple of the compression unit): after
    // a zero range ending anywhere, the next data chunks still start on cluster
    // boundaries of the target, so a qcow2 target writes each chunk as whole clusters
    // with one allocation instead of a partial cluster at either end (qemu-img aligns
    // its requests to the target's cluster size too).
    let grid = ctx.chunk.max(1);
    let next = (pos / grid)
        .saturating_add(1)
        .saturating_mul(grid)
        .min(total);
    let mut len = next - pos;
    if ctx.opts.sparse_size > 0 && ctx.opts.backing.is_none() {
        let st = block_status(ctx.src, pos, total - pos)?;
        let zero_end = match st.length == total - pos {
            true => total,
            false => (pos + st.length) / grid * grid,
        };
        if st.zero && zero_end > pos + len {
            len = zero_end - pos;
        }
    }
    let idx = c.idx;
    c.idx += 1;
    c.pos = pos + len;
    Ok(Some((idx, pos, len)))
}

pub(crate) fn run(
    ctx: &Ctx<'_>,
    dst: &dyn BlockDevice,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let cursor = Mutex::new(Cursor { idx: 0, pos: 0 });
    let mut stats = ConvertStats::default();
    let mut done = 0u64;
    let single = AtomicBool::new(false);
    progress(0, total);
    if ctx.opts.workers <= 1 {
        while let Some((_, off, len)) = claim(ctx, &cursor, total)? {
            let ops = ctx.plan(off, len)?;
            stats.add(&apply(ctx, dst, ops, &single)?);
            done += len;
            progress(done, total);
        }
        return Ok(stats);
    }

    // Ordered mode: workers stay within `window` chunks of the writer so a slow chunk
    // cannot make the reorder buffer grow: at most READ_AHEAD bytes of chunks (and at
    // least one per worker, at most four) are read ahead of the writer.
    let gate = Gate {
        written: Mutex::new(0),
        cv: Condvar::new(),
    };
    let workers64 = u64::try_from(ctx.opts.workers.min(64)).unwrap_or(64);
    let window = (READ_AHEAD / ctx.chunk.max(1)).clamp(workers64, 4 * workers64);
    let abort = AtomicBool::new(false);
    // Workers write themselves with -W, and into targets whose layout does not depend on
    // the order of writes (raw): there the result is the same as in order, and the
    // device sees several writes at once (O_DIRECT, block devices).
    let out_of_order = ctx.opts.out_of_order || dst.fixed_layout();
    let workers = ctx.opts.workers.min(64);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Msg>(workers * 2);
        for _ in 0..workers {
            let tx = tx.clone();
            let (cursor, abort, gate, single) = (&cursor, &abort, &gate, &single);
            scope.spawn(move || {
                while !abort.load(Ordering::Relaxed) {
                    let (idx, off, len) = match claim(ctx, cursor, total) {
                        Ok(Some(c)) => c,
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(Msg::Failed(e));
                            break;
                        }
                    };
                    if !out_of_order {
                        gate.wait_below(idx, window, abort);
                    }
                    let msg = match ctx.plan(off, len) {
                        Ok(ops) if out_of_order => match apply(ctx, dst, ops, single) {
                            Ok(st) => Msg::Written(len, st),
                            Err(e) => Msg::Failed(e),
                        },
                        Ok(ops) => Msg::Planned(idx, len, ops),
                        Err(e) => Msg::Failed(e),
                    };
                    if tx.send(msg).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<u64, (u64, Vec<Op>)> = BTreeMap::new();
        let mut next_write = 0u64;
        let mut first_err = None;
        for msg in rx {
            if first_err.is_some() {
                continue;
            }
            match msg {
                Msg::Failed(e) => {
                    gate.abort(&abort);
                    first_err = Some(e);
                }
                Msg::Written(len, st) => {
                    stats.add(&st);
                    done += len;
                    progress(done, total);
                }
                Msg::Planned(idx, len, ops) => {
                    pending.insert(idx, (len, ops));
                    while let Some((len, ops)) = pending.remove(&next_write) {
                        match apply(ctx, dst, ops, &single) {
                            Ok(st) => stats.add(&st),
                            Err(e) => {
                                gate.abort(&abort);
                                first_err = Some(e);
                                break;
                            }
                        }
                        next_write += 1;
                        gate.advance(next_write);
                        done += len;
                        progress(done, total);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    })
}
