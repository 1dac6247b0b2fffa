//! `commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE`: copy what FILE (and the images
//! between it and BASE) hold into BASE, growing BASE if it is smaller, then empty FILE
//! unless `-d` (or `-b`, which implies it). Generic over formats through the device
//! trait; emptying needs the format's own support (qcow2).

use anyhow::{Context, Result, anyhow, bail};
use diskimg::OpenPolicy;
use diskimg::blockio::{Preallocation, ZeroFlags};

use crate::args::{CacheArg, FormatArg, ProgressArg, QuietArg};
use crate::common::{Progress, out};

/// Arguments of `commit`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// The image of the backing chain to commit into (implies -d).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Do not empty FILE after the commit.
    #[arg(short = 'd')]
    keep: bool,
    #[command(flatten)]
    progress: ProgressArg,
    #[command(flatten)]
    quiet: QuietArg,
    #[command(flatten)]
    cache: CacheArg,
    /// Rate limit (accepted, not applied).
    #[arg(short = 'r')]
    rate: Option<String>,
    /// The image.
    file: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = (a.cache.mode(), &a.rate);
    let format = a.format.of(&a.file)?;
    // Secrets and --image-opts apply as on every verb.
    let (path, format, opts) = crate::secrets::resolve(&a.file, format)?;
    let mut opts = opts.with_policy(OpenPolicy::qemu_compatible());
    opts.read_only = false;
    opts.backing_writable = true;
    let img = if crate::imgspec::is_spec(&a.file) {
        // `json:{…}` and `blkdebug:` names (iotest 098 injects errors while emptying).
        crate::imgspec::open_arg(&a.file, format, opts)
            .with_context(|| format!("Could not open '{}'", a.file))?
    } else {
        crate::names::open_file(&a.file, &path, format, &opts)
            .with_context(|| format!("Could not open '{}'", a.file))?
    };
    crate::common::report_open_repairs(&img);
    // As qemu: progress starts once the image is open.
    let bar = Progress::new(a.progress.on() && !a.quiet.on(), 1.0);
    bar.print(0.0, 100);
    let done = commit_open(&a, &img, &bar);
    // Stores what the images keep until closed (qcow2 bitmaps), in base and top, also
    // after a failure; both failures are reported as qemu-img reports them.
    let code = crate::close_errors::finish_commit(done, img.close())?;
    if code != 0 {
        return Ok(code);
    }
    bar.end();
    if !a.quiet.on() {
        out("Image committed.\n")?;
    }
    Ok(0)
}

/// The commit itself, on the open image `img` (the chain's images closed by the caller).
fn commit_open(a: &Args, img: &diskimg::Image, bar: &Progress) -> Result<()> {
    let chain = img.chain();
    if chain.len() < 2 {
        bail!("Image does not have a backing file");
    }
    let depth = match &a.base {
        None => 1,
        Some(b) => find_base(&chain, b)
            .ok_or_else(|| anyhow!("Did not find '{b}' in the backing chain of '{}'", a.file))?,
    };
    let base = chain
        .get(depth)
        .ok_or_else(|| anyhow!("Image does not have a backing file"))?;
    let top = img.device.as_ref();
    let size = top.virtual_size();
    if base.device.virtual_size() < size {
        base.device
            .resize(size, Preallocation::Off, false)
            .with_context(|| "Could not resize the base image")?;
    }
    let depth_index = depth;
    let depth = u32::try_from(depth)?;
    // As qemu-img, a failure while copying is the block job's.
    copy_down(top, base.device.as_ref(), depth, bar)
        .map_err(|e| anyhow!("Block job failed: {}", crate::errmap::strerror(&e)))?;
    if let Some(above) = depth_index.checked_sub(1).and_then(|i| chain.get(i)) {
        diskimg::maint::relink_after_commit(above.device.as_ref(), base.device.as_ref())
            .with_context(|| "Could not relink the image above the base")?;
    }
    bar.print(100.0, 0);
    if !a.keep && a.base.is_none() {
        // As qemu: formats that cannot be emptied (vmdk) keep their data.
        match diskimg::maint::make_empty(img) {
            Err(e) if e.is_unsupported() => {}
            r => r.map_err(|e| {
                let why = crate::errmap::strerror(&e);
                anyhow!("Failed to empty {}: {why}", a.file)
            })?,
        }
    }
    Ok(())
}

/// The depth in `chain` of the image `-b` names (qemu's `bdrv_find_backing_image`): an
/// absolute name is compared as it is, a relative one against the directory of each image
/// whose backing file is compared (as backing names are relative to their overlay).
fn find_base(chain: &[&diskimg::Image], b: &str) -> Option<usize> {
    let absolute = std::path::Path::new(b).is_absolute();
    (1..chain.len()).find(|&i| {
        let (Some(above), Some(img)) = (chain.get(i - 1), chain.get(i)) else {
            return false;
        };
        let want = match absolute {
            true => std::path::PathBuf::from(b),
            false => above.path.parent().map_or_else(|| b.into(), |d| d.join(b)),
        };
        let want = std::fs::canonicalize(want).ok();
        want.is_some() && std::fs::canonicalize(&img.path).ok() == want
    })
}

/// The most one copy request moves: qemu-img's commit is the mirror-based active
/// commit job, whose requests are at most `MAX_IO_BYTES` (1 MiB). A base that runs out
/// of space then keeps what qemu's keeps: every request that fitted, whole (a failed
/// request loses only its own clusters; with 4 MiB requests we kept up to 63 fewer).
const COMMIT_CHUNK: usize = 1 << 20;

/// Copies what the images above `base` (at `depth` below `top`) hold into it, then
/// flushes it.
fn copy_down(
    top: &dyn diskimg::BlockDevice,
    base: &dyn diskimg::BlockDevice,
    depth: u32,
    bar: &Progress,
) -> diskimg::Result<()> {
    let size = top.virtual_size();
    let chunk = COMMIT_CHUNK as u64;
    let mut buf = vec![0u8; COMMIT_CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let e = diskimg::block_status(top, pos, (size - pos).min(chunk))?;
        let n = e.length.max(1).min(size - pos);
        if e.present && e.depth < depth {
            if e.zero {
                base.write_zeroes(pos, n, ZeroFlags { may_unmap: true })?;
            } else {
                let len = usize::try_from(n).map_err(|_| diskimg::Error::internal("chunk"))?;
                let b = buf
                    .get_mut(..len)
                    .ok_or(diskimg::Error::internal("chunk"))?;
                top.read_at(b, pos)?;
                base.write_at(b, pos)?;
            }
        }
        pos += n;
        bar.fraction(pos, size);
    }
    base.flush()
}
