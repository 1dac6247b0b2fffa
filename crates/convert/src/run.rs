//! Driving the chunks: sequentially, or with worker threads writing in order or
//! out of order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, mpsc};

use diskimg_blockio::{BlockDevice, Error, Result};

use crate::ConvertStats;
use crate::plan::{Ctx, Op, apply};

enum Msg {
    /// A planned chunk for the ordered writer.
    Planned(u64, Vec<Op>),
    /// A chunk a worker already wrote.
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

fn chunk_range(ctx: &Ctx<'_>, idx: u64, total: u64) -> (u64, u64) {
    let off = idx.saturating_mul(ctx.chunk);
    (off, ctx.chunk.min(total.saturating_sub(off)))
}

pub(crate) fn run(
    ctx: &Ctx<'_>,
    dst: &dyn BlockDevice,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let nchunks = total.div_ceil(ctx.chunk);
    let mut stats = ConvertStats::default();
    let mut done = 0u64;
    let single = AtomicBool::new(false);
    progress(0, total);
    if ctx.opts.workers <= 1 {
        for idx in 0..nchunks {
            let (off, len) = chunk_range(ctx, idx, total);
            let ops = ctx.plan(off, len)?;
            stats.add(&apply(dst, ops, ctx.unit, &single, ctx.pool)?);
            done += len;
            progress(done, total);
        }
        return Ok(stats);
    }

    let next = AtomicU64::new(0);
    // Ordered mode: chunks written so far; workers stay within `window` chunks of it so
    // a slow chunk cannot make the reorder buffer grow: at most `workers` chunks are
    // read ahead of the writer (memory: workers x chunk size, 16 MiB with -m 8).
    let gate = Gate {
        written: Mutex::new(0),
        cv: Condvar::new(),
    };
    let window = u64::try_from(ctx.opts.workers.min(64)).unwrap_or(64);
    let abort = AtomicBool::new(false);
    let out_of_order = ctx.opts.out_of_order;
    let workers = ctx.opts.workers.min(64);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Msg>(workers * 2);
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, abort, gate, single) = (&next, &abort, &gate, &single);
            scope.spawn(move || {
                while !abort.load(Ordering::Relaxed) {
                    let idx = next.fetch_add(1, Ordering::Relaxed);
                    if idx >= nchunks {
                        break;
                    }
                    if !out_of_order {
                        gate.wait_below(idx, window, abort);
                    }
                    let (off, len) = chunk_range(ctx, idx, total);
                    let msg = match ctx.plan(off, len) {
                        Ok(ops) if out_of_order => {
                            match apply(dst, ops, ctx.unit, single, ctx.pool) {
                                Ok(st) => Msg::Written(len, st),
                                Err(e) => Msg::Failed(e),
                            }
                        }
                        Ok(ops) => Msg::Planned(idx, ops),
                        Err(e) => Msg::Failed(e),
                    };
                    if tx.send(msg).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<u64, Vec<Op>> = BTreeMap::new();
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
                Msg::Planned(idx, ops) => {
                    pending.insert(idx, ops);
                    while let Some(ops) = pending.remove(&next_write) {
                        let (_, len) = chunk_range(ctx, next_write, total);
                        match apply(dst, ops, ctx.unit, &single, ctx.pool) {
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
