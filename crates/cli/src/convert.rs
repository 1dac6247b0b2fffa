//! `convert [-f FMT] [-O FMT] [-o OPTS] [-c] [-C] [-p] [-q] [-S SIZE] [-n] [--target-is-zero]
//! [-B BACKING [-F FMT]] [-m N] [-W] SRC... DST`.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use diskimg::blockio::FileStorage;
use diskimg::{BlockDevice, CacheMode, Format, Image, ImageOptions, OpenPolicy};
use diskimg_convert::{ConcatDevice, ConvertOptions, UnsafeCache, convert};

use crate::common::{
    Progress, open_resolved, opt_format, parse_format, parse_size, round_to_sector,
};
use crate::create::{known_option, parse_options, print_help};

mod pipe;
mod salvage;
mod stdout;
mod targets;

/// Arguments of `convert`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Source format (probed when omitted).
    #[arg(short = 'f', long = "source-format")]
    format: Option<String>,
    /// Output format (default raw).
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    /// Output format options (`-o help` lists them); may repeat.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Compress the output (formats with compressed writes).
    #[arg(short = 'c')]
    compress: bool,
    /// Copy offloading: data is copied with copy_file_range where the formats allow.
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_range: bool,
    /// Copy the source's persistent dirty bitmaps (qcow2 to qcow2).
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps: skip bitmaps marked in-use instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Minimum run of zero bytes to leave unallocated (default 4k; 0 = fully allocate).
    #[arg(short = 'S', long = "sparse-size")]
    sparse: Option<String>,
    /// Do not create the target: write into an existing image.
    #[arg(short = 'n')]
    no_create: bool,
    /// The existing target (with -n) already reads as zeroes.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Backing file of the output (only ranges differing from it are written).
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the -B backing file.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Parallel workers (1..16, default 8).
    #[arg(short = 'm', long = "parallel", default_value_t = 8)]
    workers: usize,
    /// Copy what can be read of a damaged source: unreadable sectors become zeroes
    /// (each reported), failing block-status queries read as data.
    #[arg(long = "salvage")]
    salvage: bool,
    /// Allow out-of-order writes.
    #[arg(short = 'W', long = "oob-writes")]
    out_of_order: bool,
    /// Source internal snapshot: `snapshot.id=ID`, `snapshot.name=NAME` or `ID_OR_NAME`.
    #[arg(short = 'l')]
    snapshot: Option<String>,
    /// Source cache mode: `writeback` (default), `none`/`directsync` (O_DIRECT reads),
    /// `writethrough`, `unsafe`.
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Target cache mode (docs/cli.md). Default: flushes skipped while the image is
    /// built, written back as it goes, one flush at the end (durable on return).
    /// `unsafe`: no flush at all (qemu-img's default); `writeback`: every flush honoured;
    /// `none`: O_DIRECT; `writethrough`/`directsync`: every write durable.
    #[arg(short = 't')]
    cache: Option<String>,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Output shaped for an upload: `azure` (fixed VHD, whole MiB), `esxi`
    /// (stream-optimized VMDK for vSphere), `gcp` (`disk.raw` in an oldgnu tar.gz), `ova`
    /// (OVF package); see docs/pipelines.md.
    #[arg(long = "target", value_enum)]
    target: Option<targets::Target>,
    /// Source image(s) followed by the output file.
    #[arg(num_args = 1..)]
    files: Vec<String>,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let created = !a.no_create;
    let files = a.files.clone();
    let r = run_inner(a);
    // A conversion from a stream that failed leaves no target behind that could pass
    // for a complete image.
    if r.is_err()
        && created
        && pipe::was_created()
        && let Some((dst, srcs)) = files.split_last()
        && pipe::any_stream(srcs)
        && dst != "-"
    {
        let _ = std::fs::remove_file(dst);
    }
    r
}

fn run_inner(mut a: Args) -> Result<i32> {
    crate::optlist::check(&a.options)?;
    if let Some(t) = a.target {
        targets::apply(&mut a, t)?;
    }
    crate::common::set_force_share(a.force_share);
    // None: the durable default (see `open_target`).
    let cache = a.cache.as_deref().map(CacheMode::parse).transpose()?;
    let src_cache = a
        .src_cache
        .as_deref()
        .map(CacheMode::parse)
        .transpose()?
        .unwrap_or_default();
    // An unknown output format is reported once progress has started, as qemu does.
    let out_fmt = crate::common::parse_create_format(&a.output_format);
    if crate::optlist::wants_help(&a.options) {
        // As qemu: the protocol's options too once a target file is named.
        return print_help(out_fmt?, !a.files.is_empty());
    }
    if a.copy_range && a.compress {
        bail!("Cannot enable copy offloading when -c is used");
    }
    if a.copy_range && a.sparse.is_some() {
        bail!("Cannot enable copy offloading when -S is used");
    }
    if a.copy_range && a.salvage {
        bail!("Cannot use copy offloading in salvaging mode");
    }
    let snapshot = a
        .snapshot
        .as_deref()
        .map(diskimg::SnapshotSelector::parse)
        .transpose()?;
    if a.target_is_zero && !a.no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    if a.no_create && !a.options.is_empty() {
        bail!("-o has no effect when skipping image creation");
    }
    if a.target_is_zero && a.backing.is_some() {
        bail!("--target-is-zero cannot be used with -B");
    }
    if !(1..=16).contains(&a.workers) {
        bail!("Invalid number of coroutines specified. Must be between 1 and 16.");
    }
    let sparse = match &a.sparse {
        Some(s) => {
            let v = parse_size(s)
                .ok()
                .filter(|v| v % 512 == 0 && *v <= 16 << 20);
            v.ok_or_else(|| anyhow!("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output)."))?
        }
        None => diskimg_convert::DEFAULT_SPARSE,
    };
    let Some((dst_name, srcs)) = a.files.split_last().filter(|(_, s)| !s.is_empty()) else {
        bail!("Expecting image file name");
    };
    // As qemu: progress starts (and its final newline is due) before the sources open.
    // With stdout as the target, progress goes to stderr (`stdout::run`).
    let bar = Progress::new(
        a.progress && !a.quiet && dst_name != "-" && !targets::writes_itself(a.target),
        1.0,
    );
    bar.print(0.0, 100);
    let out_fmt = out_fmt?;
    let mut parts: Vec<Arc<dyn BlockDevice>> = Vec::new();
    let mut salvaged = Vec::new();
    let mut _images = Vec::new();
    for s in srcs {
        let src_fmt = opt_format(a.format.as_deref(), s)?;
        let img = pipe::open_source(s, src_fmt, src_cache)?;
        let dev = match &snapshot {
            Some(sel) => diskimg::snapshot_device(&img, sel)?,
            None => img.device.clone(),
        };
        if a.salvage {
            let w = salvage::wrap(dev, a.quiet);
            salvaged.push(w.clone());
            parts.push(w);
        } else {
            parts.push(dev);
        }
        _images.push(img);
    }
    let src: Arc<dyn BlockDevice> = match parts.as_slice() {
        [one] => one.clone(),
        _ => Arc::new(ConcatDevice::new(parts)?),
    };
    if let Some(t) = a.target.filter(|&t| targets::writes_itself(Some(t))) {
        return targets::run(&a, t, src.as_ref(), &_images, dst_name);
    }
    if dst_name == "-" {
        return stdout::run(&a, src.as_ref(), &_images, out_fmt);
    }
    let total = src.virtual_size();
    pipe::check_target(&_images, out_fmt, a.no_create)?;

    let mut target_is_zero = a.target_is_zero;
    let mut key_secret = None;
    let mut out_backing = a.backing.clone();
    if !a.no_create {
        let mut options = parse_options(&a.options)?;
        key_secret = options
            .get("encrypt.key-secret")
            .or_else(|| options.get("key-secret"))
            .map(str::to_string);
        let specs = out_fmt.driver()?.create_options();
        // As qemu: `-o backing_file=` is -B (and wins over it).
        if let Some(b) = options.get("backing_file") {
            out_backing = Some(b.to_string());
        }
        if srcs.len() > 1 && out_backing.is_some() {
            bail!(
                "Having a backing file for the target makes no sense when concatenating multiple input images"
            );
        }
        if let Some(b) = &out_backing {
            if !specs.iter().any(|s| s.name == "backing_file") {
                bail!(
                    "{dst_name}: Backing file not supported for file format '{}'",
                    out_fmt.name()
                );
            }
            options.set("backing_file", b);
            // qemu takes the format from -F or from -o backing_fmt=.
            let bf = a
                .backing_format
                .clone()
                .or_else(|| options.get("backing_fmt").map(str::to_string))
                .ok_or_else(|| anyhow!("Use of backing file requires explicit backing format"))?;
            parse_format(&bf)?;
            options.set("backing_fmt", &bf);
        }
        for (k, _) in options.entries() {
            if !known_option(out_fmt, k)? {
                bail!("{dst_name}: Invalid parameter '{k}'");
            }
        }
        let opts = ImageOptions::default()
            .with_policy(OpenPolicy::qemu_compatible())
            .with_secrets(crate::secrets::secrets());
        diskimg::create(
            dst_name,
            out_fmt,
            Some(round_to_sector(total)?),
            options,
            &opts,
        )
        .map_err(|e| anyhow!("{dst_name}: error while converting {}: {e}", out_fmt.name()))?;
        pipe::mark_created();
        // A fresh image reads as zeroes; with a backing file it reads as the backing.
        target_is_zero = out_backing.is_none();
    }
    // Only a target created here (no backing file to attach, not encrypted) takes the
    // default's skipped-flush path; a new encrypted target opens with the secret it was
    // created with (the target is a plain file name: qemu's --image-opts names sources
    // only).
    let fresh = !a.no_create && out_backing.is_none() && key_secret.is_none();
    let dst = open_target(dst_name, out_fmt, cache, fresh, key_secret.as_deref())?;
    if a.no_create && _images.iter().any(pipe::unknown_length) {
        pipe::copy_into_existing(src.as_ref(), &_images, dst.device.as_ref(), &mut |d, t| {
            bar.fraction(d, t)
        })
        .map_err(|e| anyhow!("error while writing to {dst_name}: {e}"))?;
        dst.finish()
            .map_err(|e| anyhow!("error while writing to {dst_name}: {e}"))?;
        bar.print(100.0, 0);
        bar.end();
        return Ok(0);
    }
    if dst.device.virtual_size() < total {
        bail!("output file is smaller than input file");
    }
    if a.compress && dst.device.compressed_write_granularity().is_none() {
        bail!("Compression not supported for this file format");
    }
    let backing = if out_backing.is_some() {
        dst.device.backing_device()
    } else {
        None
    };
    let opts = ConvertOptions {
        sparse_size: sparse,
        target_is_zero,
        compress: a.compress,
        backing,
        // Salvage copies in order (its warnings come in offset order).
        workers: if a.salvage { 1 } else { a.workers },
        out_of_order: a.out_of_order,
        copy_offload: a.copy_range,
        ..ConvertOptions::default()
    };
    salvage::pre_pass(&salvaged)?;
    // qemu counts progress over the data it copies (0% was printed above), so its copy
    // loop only reaches 100% when there was data; the final 100% is printed in any case.
    let stats = convert(src.as_ref(), dst.device.as_ref(), &opts, &mut |d, t| {
        let (d, t) = pipe::progress(&_images, d, t);
        if d > 0 && d < t {
            bar.fraction(d, t);
        }
    })
    .map_err(|e| anyhow!("error while writing to {dst_name}: {e}"))?;
    dst.finish()
        .map_err(|e| anyhow!("error while writing to {dst_name}: {e}"))?;
    pipe::finish(&_images, dst_name, out_fmt)?;
    if a.bitmaps {
        copy_bitmaps(&_images, dst_name, out_fmt, a.skip_broken_bitmaps)?;
    }
    let copied = stats.data_bytes + stats.compressed_bytes;
    if copied > 0 || (sparse == 0 && stats.zeroed_bytes > 0) {
        bar.print(100.0, 0);
    }
    bar.print(100.0, 0);
    bar.end();
    Ok(0)
}

/// `convert --bitmaps`: recreate every persistent bitmap of the (single, qcow2) source in
/// the (qcow2) target with the same granularity, state and bits.
fn copy_bitmaps(srcs: &[Image], dst_name: &str, out_fmt: Format, skip_broken: bool) -> Result<()> {
    let [src] = srcs else {
        bail!("Cannot copy bitmaps from multiple sources");
    };
    if src.format != Format::Qcow2 || out_fmt != Format::Qcow2 {
        bail!("Source and target must both be qcow2 to copy bitmaps");
    }
    for b in diskimg::maint::bitmaps_of(src.device.as_ref()) {
        let name = &b.name;
        if b.in_use {
            if skip_broken {
                eprintln!(
                    "{}: warning: Skipping inconsistent bitmap '{name}'",
                    crate::common::prog()
                );
                continue;
            }
            bail!(
                "Cannot copy inconsistent bitmap '{name}'\nTry --skip-broken-bitmaps, or use 'diskimg bitmap --remove' to delete it"
            );
        }
        let dst = std::path::Path::new(dst_name);
        diskimg::maint::copy_bitmap(src.device.as_ref(), &b, dst, out_fmt)
            .with_context(|| format!("Failed to copy bitmap '{name}'"))?;
    }
    Ok(())
}

/// The conversion target, in its cache mode.
struct Target {
    device: Arc<dyn BlockDevice>,
    _image: Option<Image>,
    /// The default mode: the storage to flush once the device is closed.
    cache: Option<Arc<UnsafeCache>>,
}

/// Opens the target in cache mode `cache` (qemu's meaning of each mode; see
/// docs/cli.md), or, without `-t`, in the durable default: a single-file image `fresh`ly
/// created here is opened on an [`UnsafeCache`] storage (the format's ordering flushes
/// are skipped while the image is built, finished runs are written back as they
/// complete) and flushed once at the end; other targets (`-n`, `-B`, encrypted, images
/// with extent or data files) are opened with every flush honoured.
fn open_target(
    name: &str,
    fmt: Format,
    cache: Option<CacheMode>,
    fresh: bool,
    key: Option<&str>,
) -> Result<Target> {
    // `-U` is for the sources.
    crate::common::set_force_share(false);
    if cache.is_none() && fresh {
        let file =
            FileStorage::open(name, false).with_context(|| format!("Could not open '{name}'"))?;
        crate::common::lock_own_file(&file, fmt, name)?;
        let cache = Arc::new(UnsafeCache::new(Arc::new(file)));
        if let Ok(device) = diskimg::open_storage(cache.clone(), Some(fmt), false) {
            return Ok(Target {
                device,
                _image: None,
                cache: Some(cache),
            });
        }
    }
    let opts = crate::secrets::with_key(key).with_cache(cache.unwrap_or_default());
    let img = open_resolved(name, name, Some(fmt), opts, false, true)?;
    Ok(Target {
        device: img.device.clone(),
        _image: Some(img),
        cache: None,
    })
}

impl Target {
    /// Closes the device (drivers may write on close), then makes the file durable.
    fn finish(self) -> diskimg::Result<()> {
        let Target {
            device,
            _image,
            cache,
        } = self;
        // Drivers may write on close (qcow2 stores bitmaps); report their errors.
        device.close()?;
        if let Some(img) = &_image {
            img.close()?;
        }
        drop(device);
        drop(_image);
        match cache {
            Some(c) => c.flush_inner(),
            None => Ok(()),
        }
    }
}
