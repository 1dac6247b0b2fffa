//! `rebase [-f FMT] [-u] [-p] [-q] -b BACKING [-F FMT] FILE`: change the backing file.
//! Safe mode (the default) first copies into FILE every range where the old and the new
//! backing differ and FILE holds nothing; `-u` only rewrites the header; `-b ""` detaches.

use anyhow::{Context, Result, anyhow, bail};
use diskimg::blockio::{InfoValue, ZeroFlags};
use diskimg::{BlockDevice, ImageOptions, OpenPolicy};

use crate::args::{CacheArg, FormatArg, ProgressArg, QuietArg};
use crate::common::{Progress, full_backing_name, parse_format};

/// Arguments of `rebase`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// The new backing file ("" detaches).
    #[arg(short = 'b', long = "backing", required = true)]
    backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Unsafe: only rewrite the backing file name.
    #[arg(short = 'u')]
    unsafe_: bool,
    #[command(flatten)]
    progress: ProgressArg,
    /// Write the copied clusters compressed.
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    #[command(flatten)]
    quiet: QuietArg,
    #[command(flatten)]
    cache: CacheArg,
    /// Source cache mode (accepted).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// The image.
    file: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = (a.cache.mode(), &a.src_cache);
    // As qemu: progress starts before the image opens.
    let bar = Progress::new(a.progress.on() && !a.quiet.on(), 2.0);
    bar.print(0.0, 100);
    let backing = a.backing.clone().unwrap_or_default();
    let format = a.format.of(&a.file)?;
    if let Some(f) = &a.backing_format {
        if a.unsafe_ {
            crate::common::check_backing_format_name(f)?;
        } else {
            parse_format(f)?;
        }
    }
    // Secrets and --image-opts apply as on every verb.
    let (path, format, opts) = crate::secrets::resolve(&a.file, format)?;
    let mut opts = opts
        .with_policy(OpenPolicy::qemu_compatible())
        .with_backing(!a.unsafe_);
    opts.read_only = false;
    let img = if crate::imgspec::is_spec(&a.file) {
        // `json:{…}` and `blkdebug:` names, as on every verb.
        crate::imgspec::open_arg(&a.file, format, opts)
    } else {
        crate::names::open_file(&a.file, &path, format, &opts)
    }
    .with_context(|| format!("Could not open '{}'", a.file))?;
    crate::common::report_open_repairs(&img);
    if a.compress && img.device.compressed_write_granularity().is_none() {
        bail!("Compression not supported for this file format");
    }
    let change_err =
        |why: String| anyhow!("Could not change the backing file to '{backing}': {why}");
    if img.format != diskimg::Format::Qcow2 {
        // qemu fails in the header change, after reporting 100%.
        bar.print(100.0, 0);
        return Err(change_err("Operation not supported".into()));
    }
    if !a.unsafe_ {
        let new: Option<std::sync::Arc<dyn BlockDevice>> = if backing.is_empty() {
            None
        } else {
            let path = full_backing_name(&a.file, &backing);
            let bf = a.backing_format.as_deref().map(parse_format).transpose()?;
            let opts = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
            let nb = crate::names::open_file(&path, &crate::names::host_path(&path), bf, &opts)
                .with_context(|| format!("Could not open new backing file '{path}'"))?;
            Some(nb.device)
        };
        copy_differences(img.device.as_ref(), new.as_deref(), &bar, a.compress)?;
    }
    // As qemu: the safe-mode copy has happened when the missing format is refused.
    if !backing.is_empty() && a.backing_format.is_none() {
        bar.print(100.0, 0);
        return Err(change_err("backing format must be specified".into()));
    }
    let changed = diskimg::maint::set_backing_file(
        &img,
        Some(backing.as_str()).filter(|b| !b.is_empty()),
        a.backing_format.as_deref(),
    )
    .map_err(|e| change_err(e.to_string()));
    // qemu reports 100% whether or not the header change worked.
    bar.print(100.0, 0);
    changed?;
    img.close()?;
    Ok(0)
}

/// Copies into `top` (reading through its old backing chain) every top-cluster-sized
/// piece that `top` does not hold itself and whose content differs from `new`'s (zeroes
/// where `new` is absent or shorter).
fn copy_differences(
    top: &dyn BlockDevice,
    new: Option<&dyn BlockDevice>,
    bar: &Progress,
    compress: bool,
) -> Result<()> {
    let size = top.virtual_size();
    let info = top.info();
    let piece = info.cluster_size.unwrap_or(65536).clamp(512, 2 << 20);
    // As qemu: differences are written at the target's subcluster granularity (holes
    // between differing subclusters stay unallocated); compressed writes go per cluster.
    let extended = info.format_specific.as_ref().is_some_and(|(_, d)| {
        d.iter()
            .any(|(k, v)| k == "extended-l2" && matches!(v, InfoValue::Bool(true)))
    });
    let align = usize::try_from(if extended { piece / 32 } else { piece })?.max(512);
    let new_size = new.map_or(0, BlockDevice::virtual_size);
    // Past the old backing file's end the top read zeroes: qemu writes zeroes there
    // (zero clusters), data elsewhere.
    let old_size = top.backing_device().map_or(0, |b| b.virtual_size());
    let mut old_buf = vec![0u8; usize::try_from(piece)?];
    let mut new_buf = vec![0u8; usize::try_from(piece)?];
    let mut pos = 0u64;
    while pos < size {
        let e = top.map(pos, size - pos)?;
        let end = pos.saturating_add(e.len.max(1)).min(size);
        if e.kind.is_present() {
            pos = end;
            bar.fraction(pos, size);
            continue;
        }
        while pos < end {
            let n = (piece - pos % piece).min(end - pos);
            let nu = usize::try_from(n)?;
            let short = || anyhow!("buffer");
            let old = old_buf.get_mut(..nu).ok_or_else(short)?;
            let newb = new_buf.get_mut(..nu).ok_or_else(short)?;
            top.read_at(old, pos)?;
            newb.fill(0);
            if let Some(nd) = new
                && pos < new_size
            {
                let m = usize::try_from((new_size - pos).min(n))?;
                nd.read_at(newb.get_mut(..m).ok_or_else(short)?, pos)?;
            }
            if old != newb {
                // Whole compression units (the last may be short) go compressed.
                let unit = top.compressed_write_granularity().filter(|_| compress);
                match unit {
                    _ if pos >= old_size => top.write_zeroes(pos, n, ZeroFlags::default())?,
                    Some(g) if pos.is_multiple_of(g) && (n == g || pos + n == size) => {
                        top.write_compressed(old, pos)?;
                    }
                    _ => write_differing(top, old, newb, pos, align)?,
                }
            }
            pos += n;
            bar.fraction(pos, size);
        }
    }
    Ok(())
}

/// Writes the runs of `align`-sized chunks of `old` (guest bytes at `pos`) that differ
/// from `new`, as qemu-img's `compare_buffers` walk does.
fn write_differing(
    top: &dyn BlockDevice,
    old: &[u8],
    new: &[u8],
    pos: u64,
    align: usize,
) -> Result<()> {
    let differs = |k: usize| {
        let e = k.saturating_add(align).min(old.len());
        old.get(k..e) != new.get(k..e)
    };
    let mut i = 0;
    while i < old.len() {
        let d = differs(i);
        let mut j = i;
        while j < old.len() && differs(j) == d {
            j = j.saturating_add(align).min(old.len());
        }
        if d {
            let run = old.get(i..j).ok_or_else(|| anyhow!("buffer"))?;
            top.write_at(run, pos + i as u64)?;
        }
        i = j;
    }
    Ok(())
}
