//! `bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N] [-i AIO] [-n] [--no-drain]
//! [-o OFFSET] [--pattern=BYTE] [-q] [-s BUFFER_SIZE] [-S STEP] [-t CACHE] [-w] [-U] FILE`:
//! qemu-img bench through the library, with `DEPTH` threads (at most [`MAX_THREADS`])
//! each doing one request at a time.
//!
//! Request `i` goes to `offset` for `i = 0`, then `(offset + i * step) % size` — qemu-img
//! 10.0.2's rule (`b->offset += step; b->offset %= image_size`), so a request that would
//! cross the end of the image fails as it does in qemu ("Failed request"). Writes carry the
//! pattern byte (default 0). With `--flush-interval=N`, every N-th completed request is
//! followed by a flush; unless `--no-drain`, the flush waits for the requests in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use diskimg::BlockDevice;

use crate::args::{ForceShareArg, FormatArg};
use crate::common::{open_image, warn_probed_raw};

/// Threads used at most, whatever `-d` asks (qemu keeps `DEPTH` requests in flight on
/// one thread; one OS thread per request would not scale to qemu's limit of 2^31).
pub(crate) const MAX_THREADS: u64 = 256;

/// Arguments of `bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Number of requests (default 75000).
    #[arg(short = 'c')]
    count: Option<String>,
    /// Requests in parallel (default 64).
    #[arg(short = 'd')]
    depth: Option<String>,
    #[command(flatten)]
    format: FormatArg,
    /// Flush after every N requests (write tests only).
    #[arg(long = "flush-interval")]
    flush_interval: Option<String>,
    /// AIO mode (threads, native, io_uring; accepted, the library does positional I/O).
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Native AIO (accepted).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Do not wait for requests in flight before a flush.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset", allow_hyphen_values = true)]
    offset: Option<String>,
    /// Byte written by write requests (default 0).
    #[arg(long = "pattern")]
    pattern: Option<String>,
    /// Quiet (qemu-img bench prints its lines regardless).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Bytes per request (default 4K).
    #[arg(short = 's', long = "buffer-size")]
    size: Option<String>,
    /// Distance between the offsets of consecutive requests (default: the buffer size).
    #[arg(short = 'S', long = "step-size")]
    step: Option<String>,
    /// Cache mode (validated, accepted).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Write test (default: read).
    #[arg(short = 'w', long = "write")]
    write: bool,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// The image.
    file: String,
}

/// qemu_strtoi-style integer in `min..=max`, with qemu's two error shapes.
fn int_arg(v: Option<&str>, default: u64, what: &str, min: u64, max: u64) -> Result<u64> {
    let Some(s) = v else { return Ok(default) };
    let n = strtol(s).ok_or_else(|| anyhow!("Invalid {what} specified: '{s}'."))?;
    u64::try_from(n)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| anyhow!("Invalid {what} specified. Must be between {min} and {max}."))
}

/// C `strtol` with base 0 over the whole string: `0x` hex, leading-`0` octal, decimal.
fn strtol(s: &str) -> Option<i128> {
    let (neg, t) = match s.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i128::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        i128::from_str_radix(t.get(1..)?, 8).ok()?
    } else {
        t.parse().ok()?
    };
    Some(if neg { -v } else { v })
}

/// cvtnum-style size (`4k`, `1M`) in `min..=max`.
fn size_arg(v: Option<&str>, default: u64, what: &str, min: u64, max: u64) -> Result<u64> {
    let Some(s) = v else { return Ok(default) };
    if s.starts_with('-') {
        bail!("Invalid {what} specified. Must be between {min} and {max}.");
    }
    let n = diskimg::parse_size(s).map_err(|_| anyhow!("Invalid {what} specified: '{s}'."))?;
    if !(min..=max).contains(&n) {
        bail!("Invalid {what} specified. Must be between {min} and {max}.");
    }
    Ok(n)
}

const I32_MAX: u64 = i32::MAX as u64;

/// The validated parameters of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    count: u64,
    depth: u64,
    size: u64,
    step: u64,
    offset: u64,
    pattern: u8,
    write: bool,
    flush_interval: u64,
    drain: bool,
}

impl Plan {
    /// Offset of request `i` (qemu-img 10.0.2's wrap rule).
    fn offset_of(&self, i: u64, image_size: u64) -> u64 {
        if i == 0 {
            return self.offset;
        }
        if image_size == 0 {
            return 0;
        }
        let o = u128::from(self.offset) + u128::from(i) * u128::from(self.step);
        u64::try_from(o % u128::from(image_size)).unwrap_or(0)
    }
}

fn parse(a: &Args) -> Result<Plan> {
    let count = int_arg(a.count.as_deref(), 75000, "request count", 1, I32_MAX)?;
    let depth = int_arg(a.depth.as_deref(), 64, "queue depth", 1, I32_MAX)?;
    let offset = size_arg(a.offset.as_deref(), 0, "offset", 0, i64::MAX as u64)?;
    let size = size_arg(a.size.as_deref(), 4096, "buffer size", 1, I32_MAX)?;
    let step = size_arg(a.step.as_deref(), 0, "step size", 0, I32_MAX)?;
    let pattern = int_arg(a.pattern.as_deref(), 0, "pattern byte", 0, 255)?;
    let flush_interval = int_arg(a.flush_interval.as_deref(), 0, "flush interval", 0, I32_MAX)?;
    if let Some(c) = &a.cache
        && !["none", "writeback", "writethrough", "directsync", "unsafe"].contains(&c.as_str())
    {
        bail!("Invalid cache mode");
    }
    if let Some(i) = &a.aio
        && !["threads", "native", "io_uring"].contains(&i.as_str())
    {
        bail!("Invalid aio option: {i}");
    }
    if flush_interval > 0 && !a.write {
        bail!("--flush-interval is only available in write tests");
    }
    if flush_interval > 0 && flush_interval < depth {
        bail!("Flush interval can't be smaller than depth");
    }
    Ok(Plan {
        count,
        depth,
        size,
        step: if step == 0 { size } else { step },
        offset,
        pattern: u8::try_from(pattern).unwrap_or(0),
        write: a.write,
        flush_interval,
        drain: !a.no_drain,
    })
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = (a.native, a.quiet);
    a.force_share.apply();
    let plan = parse(&a)?;
    let fmt = a.format.of(&a.file)?;
    let img = open_image(&a.file, fmt, !plan.write, true)?;
    if plan.write {
        warn_probed_raw(&a.file, fmt, &img);
    }
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        plan.count,
        if plan.write { "write" } else { "read" },
        plan.size,
        plan.depth,
        plan.offset,
        plan.step
    );
    if plan.flush_interval > 0 {
        println!("Sending flush every {} requests", plan.flush_interval);
    }
    let start = Instant::now();
    execute(img.device.as_ref(), &plan).map_err(|e| anyhow!("Failed request: {e}"))?;
    println!(
        "Run completed in {:.3} seconds.",
        start.elapsed().as_secs_f64()
    );
    img.close()?;
    Ok(0)
}

/// Runs the requests on `min(depth, count, MAX_THREADS)` threads.
fn execute(dev: &dyn BlockDevice, plan: &Plan) -> diskimg::Result<()> {
    let image_size = dev.virtual_size();
    let len = usize::try_from(plan.size).map_err(|_| diskimg::Error::invalid("buffer size"))?;
    let threads = plan.depth.min(plan.count).min(MAX_THREADS);
    let next = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<diskimg::Error>> = Mutex::new(None);
    // I/O holds the read side; a draining flush takes the write side.
    let gate = RwLock::new(());
    let record = |e: diskimg::Error| {
        failed.store(true, Ordering::Relaxed);
        let mut slot = first_err.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![if plan.write { plan.pattern } else { 0 }; len];
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= plan.count {
                        break;
                    }
                    let off = plan.offset_of(i, image_size);
                    let r = {
                        let _g = gate.read().unwrap_or_else(|p| p.into_inner());
                        if plan.write {
                            dev.write_at(&buf, off)
                        } else {
                            dev.read_at(&mut buf, off)
                        }
                    };
                    if let Err(e) = r {
                        record(e);
                        break;
                    }
                    let done = completed.fetch_add(1, Ordering::Relaxed) + 1;
                    if plan.flush_interval > 0 && done.is_multiple_of(plan.flush_interval) {
                        let r = if plan.drain {
                            let _g = gate.write().unwrap_or_else(|p| p.into_inner());
                            dev.flush()
                        } else {
                            dev.flush()
                        };
                        if let Err(e) = r {
                            record(e);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if plan.write {
        dev.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(offset: u64, step: u64) -> Plan {
        Plan {
            count: 10,
            depth: 1,
            size: 4096,
            step,
            offset,
            pattern: 0,
            write: false,
            flush_interval: 0,
            drain: true,
        }
    }

    #[test]
    fn strtol_bases() {
        assert_eq!(strtol("0x33"), Some(0x33));
        assert_eq!(strtol("017"), Some(15));
        assert_eq!(strtol("-5"), Some(-5));
        assert_eq!(strtol("0"), Some(0));
        assert_eq!(strtol("x"), None);
        assert_eq!(strtol("0x"), None);
    }

    #[test]
    fn offsets_wrap_like_qemu_10() {
        let p = plan(1024, 8192);
        assert_eq!(p.offset_of(0, 65536), 1024);
        assert_eq!(p.offset_of(1, 65536), 9216);
        // 1024 + 8 * 8192 = 66560 wraps to 1024.
        assert_eq!(p.offset_of(8, 65536), 1024);
        // An offset past the end is used as given for the first request only.
        assert_eq!(plan(70000, 4096).offset_of(0, 65536), 70000);
        assert_eq!(plan(70000, 4096).offset_of(1, 65536), 74096 % 65536);
        assert_eq!(plan(0, 4096).offset_of(5, 0), 0);
    }
}
