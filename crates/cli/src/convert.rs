//! `convert [-f FMT] [-O FMT] [-o OPTS] [-c] [-C] [-p] [-q] [-S SIZE] [-n] [--target-is-zero]
//! [-B BACKING [-F FMT]] [-m N] [-W] SRC... DST`.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use diskimg::blockio::FileStorage;
use diskimg::{BlockDevice, CacheMode, Format, Image, ImageOptions, OpenPolicy};
use diskimg_convert::{
    ConcatDevice, ConvertOptions, LazyGrowth, UnsafeCache, WriteBehind, convert,
};

use crate::common::{
    Progress, open_resolved, opt_format, parse_format, parse_size, round_to_sector,
};
use crate::create::{known_option, parse_options, print_help};

mod args;
mod big;
mod pipe;
mod progress;
mod salvage;
mod stdout;
mod targets;

pub(crate) use args::Args;

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
    a.force_share.apply();
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
    let flags = Flags::from_args(&a)?;
    let Some((dst_name, srcs)) = a.files.split_last().filter(|(_, s)| !s.is_empty()) else {
        bail!("Expecting image file name");
    };
    // As qemu: progress starts (and its final newline is due) before the sources open.
    // With stdout as the target, progress goes to stderr (`stdout::run`).
    let bar = Progress::new(
        a.progress.on() && !a.quiet.on() && dst_name != "-" && !targets::writes_itself(a.target),
        1.0,
    );
    bar.print(0.0, 100);
    let out_fmt = out_fmt?;
    // Sources (and output) larger than the page cache's dirty limits: see `big.rs`.
    let big = big::wanted(srcs);
    let sources = open_sources_for(&a, srcs, src_cache, flags.snapshot.as_ref(), big)?;
    let (src, images) = (sources.device.as_ref(), &sources.images);
    if let Some(t) = a.target.filter(|&t| targets::writes_itself(Some(t))) {
        return targets::run(&a, t, src, images, dst_name);
    }
    if dst_name == "-" {
        return stdout::run(&a, src, images, out_fmt);
    }
    pipe::check_target(images, out_fmt, a.no_create)?;
    let made = if a.no_create {
        Made {
            target_is_zero: a.target_is_zero,
            key_secret: None,
            backing: a.backing.clone(),
        }
    } else {
        create_target(&a, dst_name, out_fmt, srcs.len(), src.virtual_size())?
    };
    // Only a target created here (no backing file to attach, not encrypted) takes the
    // default's skipped-flush path; a new encrypted target opens with the secret it was
    // created with (the target is a plain file name: qemu's --image-opts names sources
    // only).
    let fresh = !a.no_create && made.backing.is_none() && made.key_secret.is_none();
    // The durable default of an output larger than the dirty limits: `O_DIRECT`.
    let direct = cache.is_none() && fresh && !a.compress && big;
    let dst = open_target(
        dst_name,
        out_fmt,
        (cache, direct),
        fresh,
        made.key_secret.as_deref(),
    )?;
    if a.no_create && images.iter().any(pipe::unknown_length) {
        pipe::copy_into_existing(src, images, dst.device.as_ref(), &mut |d, t| {
            bar.fraction(d, t)
        })
        .map_err(|e| anyhow!("error while writing to {dst_name}: {e}"))?;
        dst.finish()
            .map_err(|e| anyhow!("error while writing to {dst_name}: {e}"))?;
        bar.print(100.0, 0);
        bar.end();
        return Ok(0);
    }
    copy(&a, &flags, &sources, dst, &made, (dst_name, out_fmt), &bar)?;
    bar.end();
    Ok(0)
}

/// The flags of `convert` checked against each other, in qemu's order of complaints.
struct Flags {
    snapshot: Option<diskimg::SnapshotSelector>,
    /// `-S`: the run of zeroes left unallocated.
    sparse: u64,
}

impl Flags {
    fn from_args(a: &Args) -> Result<Self> {
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
        Ok(Flags { snapshot, sparse })
    }
}

/// The opened sources: the images (kept open) and the device read from (their
/// concatenation, or the selected snapshot).
struct Sources {
    device: Arc<dyn BlockDevice>,
    /// The devices `device` joins, in order.
    parts: Vec<Arc<dyn BlockDevice>>,
    images: Vec<Image>,
    /// With `--salvage`: the sources read in salvage mode.
    salvaged: Vec<Arc<crate::io::filter::Filtered<salvage::Salvage>>>,
}

/// [`open_sources`], but without `-T`, raw sources larger than the dirty limits
/// (`big`) are read with `O_DIRECT` (`big.rs`; as `-T none`, where the file system takes
/// it; not with `-l`, `--salvage` or other formats).
fn open_sources_for(
    a: &Args,
    srcs: &[String],
    cache: CacheMode,
    snapshot: Option<&diskimg::SnapshotSelector>,
    big: bool,
) -> Result<Sources> {
    if big
        && a.src_cache.is_none()
        && snapshot.is_none()
        && !a.salvage
        && let Ok(s) = open_sources(a, srcs, CacheMode::None, None)
        && s.images.iter().all(|i| i.format == Format::Raw)
    {
        return Ok(s);
    }
    open_sources(a, srcs, cache, snapshot)
}

fn open_sources(
    a: &Args,
    srcs: &[String],
    cache: CacheMode,
    snapshot: Option<&diskimg::SnapshotSelector>,
) -> Result<Sources> {
    let mut parts: Vec<Arc<dyn BlockDevice>> = Vec::new();
    let mut images = Vec::new();
    let mut salvaged = Vec::new();
    for s in srcs {
        let src_fmt = opt_format(a.format.as_deref(), s)?;
        let img = pipe::open_source(s, src_fmt, cache)?;
        let dev = match snapshot {
            Some(sel) => diskimg::snapshot_device(&img, sel)?,
            None => img.device.clone(),
        };
        if a.salvage {
            let w = salvage::wrap(dev, a.quiet.on());
            salvaged.push(w.clone());
            parts.push(w);
        } else {
            parts.push(dev);
        }
        images.push(img);
    }
    let device: Arc<dyn BlockDevice> = match parts.as_slice() {
        [one] => one.clone(),
        _ => Arc::new(ConcatDevice::new(parts.clone())?),
    };
    Ok(Sources {
        device,
        parts,
        images,
        salvaged,
    })
}

/// What creating the target decided.
struct Made {
    /// The target reads as zeroes (fresh, or `--target-is-zero`).
    target_is_zero: bool,
    /// The secret of an encrypted target.
    key_secret: Option<String>,
    /// The target's backing file (`-B` or `-o backing_file=`).
    backing: Option<String>,
}

/// Creates the target `dst_name` of `total` bytes (`-o`, `-B`/`-F`), as qemu checks it.
fn create_target(
    a: &Args,
    dst_name: &str,
    out_fmt: Format,
    sources: usize,
    total: u64,
) -> Result<Made> {
    crate::opening::check_create_name(dst_name)?;
    let mut options = parse_options(&a.options)?;
    let key_secret = options
        .get("encrypt.key-secret")
        .or_else(|| options.get("key-secret"))
        .map(str::to_string);
    let specs = out_fmt.driver()?.create_options();
    // As qemu: `-o backing_file=` is -B (and wins over it).
    let backing = options
        .get("backing_file")
        .map(str::to_string)
        .or_else(|| a.backing.clone());
    if sources > 1 && backing.is_some() {
        bail!(
            "Having a backing file for the target makes no sense when concatenating multiple input images"
        );
    }
    if let Some(b) = &backing {
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
        crate::names::host_path(dst_name),
        out_fmt,
        Some(round_to_sector(total)?),
        options,
        &opts,
    )
    .map_err(|e| anyhow!("{dst_name}: error while converting {}: {e}", out_fmt.name()))?;
    pipe::mark_created();
    Ok(Made {
        // A fresh image reads as zeroes; with a backing file it reads as the backing.
        target_is_zero: backing.is_none(),
        key_secret,
        backing,
    })
}

/// Copies the sources into the opened target, finishes it and copies the bitmaps
/// (`--bitmaps`); prints the final progress.
fn copy(
    a: &Args,
    flags: &Flags,
    sources: &Sources,
    dst: Target,
    made: &Made,
    (dst_name, out_fmt): (&str, Format),
    bar: &Progress,
) -> Result<()> {
    let (src, images) = (sources.device.as_ref(), &sources.images);
    if dst.device.virtual_size() < src.virtual_size() {
        bail!("output file is smaller than input file");
    }
    if a.compress && dst.device.compressed_write_granularity().is_none() {
        bail!("Compression not supported for this file format");
    }
    let backing = if made.backing.is_some() {
        dst.device.backing_device()
    } else {
        None
    };
    let target_backing = backing
        .as_ref()
        .filter(|_| !a.no_create)
        .map(|b| b.virtual_size());
    let opts = ConvertOptions {
        sparse_size: flags.sparse,
        target_is_zero: made.target_is_zero,
        compress: a.compress,
        backing,
        // Salvage copies in order (its warnings come in offset order).
        workers: if a.salvage { 1 } else { a.workers },
        out_of_order: a.out_of_order,
        copy_offload: a.copy_range,
        ..ConvertOptions::default()
    };
    salvage::pre_pass(&sources.salvaged)?;
    let err = |e: diskimg::Error| anyhow!("error while writing to {dst_name}: {e}");
    // qemu's records (0% was printed above), replayed from the sources' block status.
    let setup = progress::Setup {
        parts: &sources.parts,
        target: dst.device.as_ref(),
        compress: a.compress || dst.device.needs_compressed_writes(),
        count_zeroes: flags.sparse == 0,
        target_has_backing: made.backing.is_some(),
        target_backing,
    };
    let mut report = progress::Reporter::new(bar, images, &setup);
    let stats = convert(src, dst.device.as_ref(), &opts, &mut |d, t| {
        report.update(d, t);
    })
    .map_err(err)?;
    dst.finish().map_err(err)?;
    let path = crate::names::host_path(dst_name);
    pipe::finish(images, &path, out_fmt)?;
    if a.bitmaps {
        copy_bitmaps(images, &path, out_fmt, a.skip_broken_bitmaps)?;
    }
    let copied = stats.data_bytes + stats.compressed_bytes;
    report.finish(copied > 0 || (flags.sparse == 0 && stats.zeroed_bytes > 0));
    bar.print(100.0, 0);
    Ok(())
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
    /// `-t unsafe`: the storage to give its recorded length once the device is closed.
    lazy: Option<Arc<LazyGrowth>>,
}

/// Opens the target in cache mode `cache` (qemu's meaning of each mode; see
/// docs/cli.md), or, without `-t`, in the durable default: a single-file image `fresh`ly
/// created here is opened on an [`UnsafeCache`] storage (the format's ordering flushes
/// are skipped while the image is built, finished runs are written back as they
/// complete) and flushed once at the end; other targets (`-n`, `-B`, encrypted, images
/// with extent or data files) are opened with every flush honoured. With `direct` (an
/// output larger than the dirty limits, `big.rs`) a fresh image other than raw is
/// written as with `-t none` ([`open_behind`]) unless its format only takes compressed
/// writes.
fn open_target(
    name: &str,
    fmt: Format,
    (cache, direct): (Option<CacheMode>, bool),
    fresh: bool,
    key: Option<&str>,
) -> Result<Target> {
    // `-U` is for the sources.
    crate::common::set_force_share(false);
    // `-n` targets: `foo:bar` names a protocol; `file:` a file.
    crate::names::check_protocol(name, false)
        .with_context(|| format!("Could not open '{name}'"))?;
    let arg = name;
    let path = crate::names::host_path(name);
    let name = path.as_str();
    if direct
        && fmt != Format::Raw
        && let Some(t) = open_behind(name, fmt)?
    {
        if !t.device.needs_compressed_writes() {
            return Ok(t);
        }
        // Dropped (closing the file, releasing its lock) before the usual open.
        drop(t);
    }
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
                lazy: None,
            });
        }
    }
    if cache == Some(CacheMode::None)
        && fresh
        && fmt != Format::Raw
        && let Some(t) = open_behind(name, fmt)?
    {
        return Ok(t);
    }
    if cache == Some(CacheMode::Unsafe)
        && fresh
        && let Some(t) = open_unsafe(name, fmt)?
    {
        return Ok(t);
    }
    let mut opts = crate::secrets::with_key(key).with_cache(cache.unwrap_or_default());
    if fresh {
        // See `open_behind`.
        opts.driver_options.set(DEFERRED_TABLES, "on");
    }
    let img = open_resolved(arg, name, Some(fmt), opts, false, true)?;
    Ok(Target {
        device: img.device.clone(),
        _image: Some(img),
        cache: None,
        lazy: None,
    })
}

/// qcow2's driver option for a new image filled front to back: new L2 tables are
/// written with the other deferred metadata, one flush for many (crash consistent).
const DEFERRED_TABLES: &str = "x-deferred-tables";

/// Large writes in flight for `-t none` ([`open_behind`]).
const BEHIND_DEPTH: usize = 4;

/// How far ahead of its writes a `-t none` target file is grown
/// ([`WriteBehind::grow_ahead`]: XFS serialises direct writes past the end of a file).
const GROW_AHEAD: u64 = 128 << 20;

/// `-t none` onto a single-file image created here (not raw, whose workers write in
/// parallel themselves): `O_DIRECT`, with up to [`BEHIND_DEPTH`] large writes in flight
/// ([`WriteBehind`]: the ordered writer goes on while the device writes; every flush is
/// honoured and waits for them), the file grown ahead of them ([`GROW_AHEAD`]), and
/// qcow2's new L2 tables deferred (`x-deferred-tables`). `None` when the image needs more
/// than its file (the usual open then reports what is wrong).
fn open_behind(name: &str, fmt: Format) -> Result<Option<Target>> {
    open_wrapped(name, fmt, CacheMode::None, |file| {
        Arc::new(WriteBehind::new(file, BEHIND_DEPTH).grow_ahead(GROW_AHEAD))
    })
}

/// `-t unsafe` onto a single-file image created here: the file grown in name only until
/// it is closed ([`LazyGrowth`]: a qcow2's reserve is cut back at close, and on XFS a
/// file that was cut back writes back all its dirty pages when closed), new L2 tables
/// deferred. `None` as [`open_behind`].
fn open_unsafe(name: &str, fmt: Format) -> Result<Option<Target>> {
    let mut lazy = None;
    let t = open_wrapped(name, fmt, CacheMode::Unsafe, |file| {
        let l = Arc::new(LazyGrowth::new(file));
        lazy = Some(l.clone());
        l
    })?;
    Ok(t.map(|t| Target { lazy, ..t }))
}

/// The target file `name` opened in cache mode `mode`, on the storage `wrap` makes of
/// it, as a `fmt` image created here (qcow2's new L2 tables deferred).
fn open_wrapped(
    name: &str,
    fmt: Format,
    mode: CacheMode,
    wrap: impl FnOnce(Arc<dyn diskimg::blockio::Storage>) -> Arc<dyn diskimg::blockio::Storage>,
) -> Result<Option<Target>> {
    let Ok(file) = FileStorage::open_with(name, false, mode) else {
        return Ok(None);
    };
    crate::common::lock_own_file(&file, fmt, name)?;
    let storage = wrap(Arc::new(file));
    let mut opts = diskimg::blockio::OpenOptions::new();
    opts.driver_options.set(DEFERRED_TABLES, "on");
    Ok(fmt
        .driver()
        .and_then(|d| d.open(storage, &opts))
        .ok()
        .map(|device| Target {
            device,
            _image: None,
            cache: None,
            lazy: None,
        }))
}

impl Target {
    /// Closes the device (drivers may write on close), then makes the file durable.
    fn finish(self) -> diskimg::Result<()> {
        let Target {
            device,
            _image,
            cache,
            lazy,
        } = self;
        // Drivers may write on close (qcow2 stores bitmaps); report their errors.
        device.close()?;
        if let Some(img) = &_image {
            img.close()?;
        }
        drop(device);
        drop(_image);
        if let Some(l) = lazy {
            l.finish()?;
        }
        match cache {
            Some(c) => c.flush_inner(),
            None => Ok(()),
        }
    }
}
