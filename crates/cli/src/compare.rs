//! `compare [-f FMT] [-F FMT] [-s] [-q] [-p] A B`: exit 0 identical, 1 different,
//! 2 open error, 3 block-status error, 4 read error (as qemu-img).

use anyhow::{Result, anyhow};
use diskimg::{BlockDevice, block_status};

use crate::args::ForceShareArg;
use crate::common::{Progress, open_image, opt_format, out};

/// Arguments of `compare`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f')]
    format_a: Option<String>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F')]
    format_b: Option<String>,
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// First image.
    a: String,
    /// Second image.
    b: String,
}

const CHUNK: u64 = 1 << 20;

enum Fail {
    Open(anyhow::Error),
    Status(anyhow::Error),
    Read(anyhow::Error),
}

pub(crate) fn run(a: Args) -> Result<i32> {
    a.force_share.apply();
    // As qemu: progress starts before the images open; its newline ends every path.
    let bar = Progress::new(a.progress && !a.quiet, 2.0);
    // Without progress reports qemu's messages stay in stdout's buffer until exit,
    // behind an error on stderr.
    let held = std::cell::RefCell::new(String::new());
    let res = compare(&a, &bar, &held);
    bar.end();
    let code = match res {
        Ok(code) => code,
        Err(f) => {
            let (code, e) = match f {
                Fail::Open(e) => (2, e),
                Fail::Status(e) => (3, e),
                Fail::Read(e) => (4, e),
            };
            eprintln!("{}: {}", crate::common::prog(), crate::message(&e));
            code
        }
    };
    out(&held.borrow())?;
    Ok(code)
}

/// First differing sector offset within `n` bytes (qemu reports 512-byte granularity).
fn first_diff(x: &[u8], y: &[u8]) -> Option<u64> {
    x.iter().zip(y).position(|(p, q)| p != q).map(|i| i as u64)
}

fn compare(
    a: &Args,
    bar: &Progress,
    held: &std::cell::RefCell<String>,
) -> std::result::Result<i32, Fail> {
    // With progress, messages go out as they arise, between the progress reports (as
    // qemu's qprintf, flushed by each report); otherwise they are `held`.
    let say = |m: &str| {
        if a.quiet {
        } else if a.progress {
            out(m).map_err(Fail::Read)?;
        } else {
            held.borrow_mut().push_str(m);
        }
        Ok::<(), Fail>(())
    };
    let fa = opt_format(a.format_a.as_deref(), &a.a).map_err(Fail::Open)?;
    let fb = opt_format(a.format_b.as_deref(), &a.b).map_err(Fail::Open)?;
    let ia = open_image(&a.a, fa, true, true).map_err(Fail::Open)?;
    let ib = open_image(&a.b, fb, true, true).map_err(Fail::Open)?;
    let (da, db) = (ia.device.as_ref(), ib.device.as_ref());
    let (sa, sb) = (da.virtual_size(), db.virtual_size());
    bar.print(0.0, 100);
    if a.strict && sa != sb {
        say("Strict mode: Image size mismatch!\n")?;
        return Ok(1);
    }
    let common = sa.min(sb);
    let total = sa.max(sb);
    let mut pos = 0u64;
    while pos < common {
        let len = CHUNK.min(common - pos);
        let ea = block_status(da, pos, len).map_err(|_| status_failed(&a.a))?;
        let eb = block_status(db, pos, len).map_err(|_| status_failed(&a.b))?;
        let n = ea.length.min(eb.length);
        // qemu compares the whole block status (allocated, data, zero, offset valid).
        let status =
            |e: &diskimg::MapEntry| (e.present, e.data, e.zero, e.compressed, e.offset.is_some());
        if a.strict && status(&ea) != status(&eb) {
            say(&format!(
                "Strict mode: Offset {pos} block status mismatch!\n"
            ))?;
            return Ok(1);
        }
        if !(ea.zero && eb.zero) {
            let (x, y) = (read(da, &a.a, pos, n)?, read(db, &a.b, pos, n)?);
            if let Some(d) = first_diff(&x, &y) {
                say(&format!(
                    "Content mismatch at offset {}!\n",
                    (pos + d) & !511
                ))?;
                return Ok(1);
            }
        }
        pos += n;
        bar.fraction(pos, total);
    }
    if sa != sb {
        // As qemu: only once the common part compared equal.
        say("Warning: Image size mismatch!\n")?;
    }
    // The larger image must read as zeroes beyond the smaller one.
    let larger: &dyn BlockDevice = if sa > sb { da } else { db };
    let name = if sa > sb { &a.a } else { &a.b };
    while pos < total {
        let e =
            block_status(larger, pos, CHUNK.min(total - pos)).map_err(|_| status_failed(name))?;
        if !e.zero {
            let x = read(larger, name, pos, e.length)?;
            if let Some(i) = x.iter().position(|&b| b != 0) {
                let off = (pos + i as u64) & !511;
                say(&format!("Content mismatch at offset {off}!\n"))?;
                return Ok(1);
            }
        }
        pos += e.length;
        bar.fraction(pos, total);
    }
    say("Images are identical.\n")?;
    Ok(0)
}

/// qemu's words for a block status query of image `name` that failed (whatever the
/// reason: qemu-img compare does not say it).
fn status_failed(name: &str) -> Fail {
    Fail::Status(anyhow!("Sector allocation test failed for {name}"))
}

/// Reads `len` bytes at `off` of image `name` (qemu's message names it on failure).
fn read(d: &dyn BlockDevice, name: &str, off: u64, len: u64) -> std::result::Result<Vec<u8>, Fail> {
    let n = usize::try_from(len).map_err(|_| Fail::Read(anyhow!("chunk too large")))?;
    let mut buf = vec![0u8; n];
    d.read_at(&mut buf, off).map_err(|e| {
        let why = crate::errmap::strerror(&e);
        Fail::Read(anyhow!("Error while reading offset {off} of {name}: {why}"))
    })?;
    Ok(buf)
}
