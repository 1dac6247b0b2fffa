//! Async reads planned by the layout walk: zero runs filled here, host runs in io_uring
//! storages submitted together ([`gather`]), short reads finished on a worker.

use std::sync::Arc;

use super::IoBuf;
use super::pool::{IoFuture, PoolShared, Slot};
use crate::device::BlockDevice;
use crate::error::Error;
use crate::layout::{HostRun, Mapping, PastEof};
use crate::storage::{FileStorage, Piece, gather};

/// What finishing a piece needs after its read completed.
struct Part {
    file: Arc<FileStorage>,
    host: u64,
    at: usize,
    len: usize,
    past_eof: PastEof,
}

/// Plans and submits a read of `buf.len()` bytes at `offset`; `Err(buf)` when the
/// device has no walk or a run needs the format or a storage without io_uring (the
/// caller then reads on a worker).
pub(super) fn submit(
    dev: &Arc<dyn BlockDevice>,
    pool: &Arc<PoolShared>,
    mut buf: IoBuf,
    offset: u64,
) -> std::result::Result<IoFuture<IoBuf>, IoBuf> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut parts: Vec<Part> = Vec::new();
    let mut fallback = false;
    let walked = dev.walk_runs(offset, buf.len() as u64, &mut |_, pos, n, mapping| {
        let at = usize::try_from(pos - offset).unwrap_or(usize::MAX);
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let piece = match mapping {
            Mapping::Zero { .. } => {
                let chunk = buf.get_mut(at..at.saturating_add(n));
                chunk
                    .ok_or(Error::invalid("read run outside the buffer"))?
                    .fill(0);
                return Ok(());
            }
            Mapping::Host(run) => run
                .storage
                .uring()
                .and_then(|u| u.piece(&buf, at, run.offset, n))
                .map(|p| (p, run.past_eof)),
            _ => None,
        };
        let Some((p, past_eof)) = piece else {
            fallback = true;
            return Err(Error::invalid("run not readable through io_uring"));
        };
        parts.push(Part {
            file: p.file.clone(),
            host: p.host,
            at,
            len: n,
            past_eof,
        });
        pieces.push(p);
        Ok(())
    });
    match walked {
        Ok(true) => {}
        Ok(false) => return Err(buf),
        Err(_) if fallback => return Err(buf),
        Err(e) => return Ok(IoFuture::ready(Err(e))),
    }
    let (fut, slot) = IoFuture::new();
    let pool = pool.clone();
    gather(
        buf,
        pieces,
        Box::new(move |buf, results| finish(buf, &results, parts, &slot, &pool)),
    );
    Ok(fut)
}

/// Completes the future, or hands short reads to a worker to finish them as the
/// blocking path would (end of file: the run's [`PastEof`]).
fn finish(
    buf: IoBuf,
    results: &[i32],
    parts: Vec<Part>,
    slot: &Arc<Slot<IoBuf>>,
    pool: &PoolShared,
) {
    let mut short = Vec::new();
    for (p, &r) in parts.into_iter().zip(results) {
        match usize::try_from(r) {
            Ok(got) if got >= p.len => {}
            Ok(got) => short.push((p, got)),
            Err(_) => {
                let e = std::io::Error::from_raw_os_error(r.saturating_neg());
                let msg = format!("could not read {} bytes at offset {}", p.len, p.host);
                return slot.complete(Err(Error::io(msg, e)));
            }
        }
    }
    if short.is_empty() {
        return slot.complete(Ok(buf));
    }
    let slot = slot.clone();
    pool.spawn(move || {
        let mut buf = buf;
        let r = short.iter().try_for_each(|(p, got)| {
            let dst = buf
                .get_mut(p.at + got..p.at + p.len)
                .ok_or(Error::invalid("read run outside the buffer"))?;
            HostRun::new(p.file.as_ref(), p.host + *got as u64)
                .past_eof(p.past_eof)
                .read(dst)
        });
        slot.complete(r.map(|()| buf));
    });
}
