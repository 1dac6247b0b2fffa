//! Driving the chunks: sequentially, or with worker threads writing in order or
//! out of order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

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
            stats.add(&apply(dst, ops, ctx.unit, &single)?);
            done += len;
            progress(done, total);
        }
        return Ok(stats);
    }

    let next = AtomicU64::new(0);
    // Ordered mode: chunks written so far; workers stay within `window` chunks of it so
    // a slow chunk cannot make the reorder buffer grow: at most `workers` chunks are
    // read ahead of the writer (memory: workers x chunk size, 16 MiB with -m 8).
    let written = AtomicU64::new(0);
    let window = u64::try_from(ctx.opts.workers.min(64)).unwrap_or(64);
    let abort = AtomicBool::new(false);
    let out_of_order = ctx.opts.out_of_order;
    let workers = ctx.opts.workers.min(64);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Msg>(workers * 2);
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, abort, written, single) = (&next, &abort, &written, &single);
            scope.spawn(move || {
                while !abort.load(Ordering::Relaxed) {
                    let idx = next.fetch_add(1, Ordering::Relaxed);
                    if idx >= nchunks {
                        break;
                    }
                    while !out_of_order
                        && idx >= written.load(Ordering::Acquire).saturating_add(window)
                        && !abort.load(Ordering::Relaxed)
                    {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    let (off, len) = chunk_range(ctx, idx, total);
                    let msg = match ctx.plan(off, len) {
                        Ok(ops) if out_of_order => match apply(dst, ops, ctx.unit, single) {
                            Ok(st) => Msg::Written(len, st),
                            Err(e) => Msg::Failed(e),
                        },
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
                    abort.store(true, Ordering::Relaxed);
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
                        match apply(dst, ops, ctx.unit, &single) {
                            Ok(st) => stats.add(&st),
                            Err(e) => {
                                abort.store(true, Ordering::Relaxed);
                                first_err = Some(e);
                                break;
                            }
                        }
                        next_write += 1;
                        written.store(next_write, Ordering::Release);
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
