//! A stream-optimized VMDK written front to back ([`write_vmdk`]), grains deflated in
//! parallel.
//!
//! A reader thread walks the source's map a grain at a time: whole grains inside zero
//! ranges are skipped without being read, the rest is read in batches of up to 4 MiB.
//! Batches go round-robin to one deflate thread per core and come back in the same
//! round-robin order, so records reach the [`StreamWriter`] in guest order without a
//! reorder buffer. Grains that turn out to be all zeroes are left out. Memory stays at a
//! few batches per thread whatever the image size.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use diskimg_blockio::{BlockDevice, Error, Result, block_status};
use diskimg_vmdk::{STREAM_GRAIN, StreamProfile, StreamWriter, grain_record};

/// Grains per batch (4 MiB).
const BATCH_GRAINS: u64 = 64;

/// Guest bytes `[first grain * 64 KiB, end)` to deflate.
struct Batch {
    first: u64,
    data: Vec<u8>,
    end: u64,
}

/// What [`write_vmdk`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmdkStats {
    /// Bytes of the stream.
    pub bytes: u64,
    /// Grains stored (the rest read as zeroes).
    pub grains: u64,
}

/// Deflated records of a batch, and the guest offset it ends at.
type Records = Result<(Vec<(u64, Vec<u8>)>, u64)>;

/// Reads the grains that may hold data, in guest order, and sends them in batches.
fn read_batches(dev: &dyn BlockDevice, tx: &SyncSender<Result<Batch>>) -> Result<()> {
    let size = dev.virtual_size();
    let grains = size.div_ceil(STREAM_GRAIN);
    let mut g = 0;
    while g < grains {
        let start = g * STREAM_GRAIN;
        let st = block_status(dev, start, size - start)?;
        let ext_end = start + st.length;
        if st.zero && ext_end / STREAM_GRAIN > g {
            g = ext_end / STREAM_GRAIN;
            continue;
        }
        let last = grains
            .min(g + BATCH_GRAINS)
            .min(ext_end.div_ceil(STREAM_GRAIN).max(g + 1));
        let end = (last * STREAM_GRAIN).min(size);
        let mut data = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        dev.read_at(&mut data, start)?;
        if tx
            .send(Ok(Batch {
                first: g,
                data,
                end,
            }))
            .is_err()
        {
            return Ok(());
        }
        g = last;
    }
    Ok(())
}

/// Deflates the grains of `b` that are not all zeroes.
fn deflate(b: Batch) -> Records {
    let mut out = Vec::new();
    let grain = usize::try_from(STREAM_GRAIN).unwrap_or(65536);
    for (i, piece) in b.data.chunks(grain).enumerate() {
        if !diskimg_convert::is_zero(piece) {
            let g = b.first + i as u64;
            out.push((g, grain_record(g, piece)?));
        }
    }
    Ok((out, b.end))
}

/// Writes `dev` as a stream-optimized VMDK to `out` (descriptor extent name
/// `extent_name`, descriptor fields from `profile`), deflating on `threads` threads.
/// `progress(done, total)` gets guest bytes.
pub fn write_vmdk(
    dev: &dyn BlockDevice,
    out: &mut dyn Write,
    extent_name: &str,
    profile: &StreamProfile,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VmdkStats> {
    let size = dev.virtual_size();
    let mut grains = 0u64;
    let mut w = StreamWriter::new(out, size, extent_name, profile)?;
    let k = threads.clamp(1, 16);
    std::thread::scope(|s| -> Result<()> {
        let (btx, brx) = sync_channel::<Result<Batch>>(2);
        s.spawn(move || {
            if let Err(e) = read_batches(dev, &btx) {
                let _ = btx.send(Err(e));
            }
        });
        let mut work: Vec<SyncSender<Batch>> = Vec::new();
        let mut done: Vec<Receiver<Records>> = Vec::new();
        for _ in 0..k {
            let (tx, rx) = sync_channel::<Batch>(1);
            let (dtx, drx) = sync_channel::<Records>(1);
            s.spawn(move || {
                for b in rx {
                    if dtx.send(deflate(b)).is_err() {
                        return;
                    }
                }
            });
            work.push(tx);
            done.push(drx);
        }
        let mut emit = |r: Option<Records>| -> Result<()> {
            let (records, end) = r.ok_or(Error::internal("deflate thread failed"))??;
            for (g, rec) in records {
                w.push(g, &rec)?;
                grains += 1;
            }
            progress(end, size);
            Ok(())
        };
        let mut sent = 0usize;
        for b in brx {
            let slot = sent % k;
            if sent >= k {
                emit(done.get(slot).and_then(|d| d.recv().ok()))?;
            }
            let tx = work.get(slot).ok_or(Error::internal("no deflate thread"))?;
            tx.send(b?)
                .map_err(|_| Error::internal("deflate thread failed"))?;
            sent += 1;
        }
        drop(work);
        for i in sent.saturating_sub(k)..sent {
            emit(done.get(i % k).and_then(|d| d.recv().ok()))?;
        }
        Ok(())
    })?;
    let (_, bytes) = w.finish()?;
    progress(size, size);
    Ok(VmdkStats { bytes, grains })
}
