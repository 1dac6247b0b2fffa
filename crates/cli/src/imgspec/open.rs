//! Opening what an image specification names ([`Resolved`]): a file (through the
//! facade, with the spec's driver options, locking and blkdebug nodes below the format),
//! a format nested on another format's guest bytes, a quorum or a null device; and the
//! CLI's entry point for `json:`/`blkdebug:`/`--image-opts` arguments ([`open_arg`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use diskimg::blockio::FileStorage;
use diskimg::{BlockDevice, CacheMode, Format, Image, ImageOptions, OptionList};

use super::{Node, Resolved, flatten_json, resolve};
use crate::io::blkdebug::{Blkdebug, BlkdebugStorage};
use crate::io::filter::Filtered;
use crate::nodes::{DeviceStorage, NullDevice, RawWindow};

/// True for an image argument that is a specification rather than a file name
/// (`json:{…}`, `blkdebug:…`).
pub(crate) fn is_spec(arg: &str) -> bool {
    arg.starts_with("json:") || arg.starts_with("blkdebug:")
}

/// True for a specification ([`is_spec`]) or an `--image-opts` option string.
pub(crate) fn is_spec_or_opts(arg: &str) -> bool {
    is_spec(arg) || (crate::secrets::image_opts() && arg.contains('='))
}

/// Opens a `json:`/`blkdebug:`/`--image-opts` argument of a qemu-img verb (see
/// [`is_spec_or_opts`]) with `base`
/// options (secrets, policy, read-only).
pub(crate) fn open_arg(arg: &str, format: Option<Format>, base: ImageOptions) -> Result<Image> {
    let (dict, name) = arg_dict(arg)?;
    let mut opts = base;
    opts.cache = spec_cache(&dict, opts.cache);
    let r = resolve(dict, name, format)?;
    opts.read_only |= r.read_only == Some(true);
    if r.compress && !opts.read_only {
        bail!("the compress filter is supported by diskimg's qemu-io only");
    }
    let mut img = open(&r, arg, opts)?;
    // A blkdebug node above the format: its rules apply to the verb's requests.
    if !r.blkdebug.is_empty() || !r.blkdebug_limits.is_none() {
        let node = Blkdebug::new(img.device.clone(), r.blkdebug.clone(), r.blkdebug_limits);
        img.device = Arc::new(Filtered(node));
    }
    Ok(img)
}

/// The options of a `json:`/`--image-opts` argument, or the name of a `blkdebug:` one.
fn arg_dict(arg: &str) -> Result<(OptionList, Option<&str>)> {
    Ok(if arg.starts_with("json:") {
        (flatten_json(arg)?, None)
    } else if !is_spec(arg) {
        // An `--image-opts` option string.
        (OptionList::parse(arg).map_err(|e| anyhow!("{e}"))?, None)
    } else {
        (OptionList::new(), Some(arg))
    })
}

/// The host cache mode [`open_arg`] opens `arg`'s files in when the verb asks for
/// `base` (`diskimg serve --cache`): what `serve` tunes its threads for.
pub(crate) fn arg_cache(arg: &str, base: CacheMode) -> Result<CacheMode> {
    Ok(spec_cache(&arg_dict(arg)?.0, base))
}

/// `base` (the verb's `--cache`/`-t`) as the options `dict` amend it: their own
/// `file.cache.direct` or else `cache.direct` wins, as in qemu, where the verb's mode
/// only sets these keys' defaults (`qdict_set_default_str`); `on` is `O_DIRECT`, as
/// qemu's file driver opens it, `off` the page cache. qemu-nbd 10 opens
/// `--cache none --image-opts …,cache.direct=off` without `O_DIRECT`, the same
/// without the key with it.
fn spec_cache(dict: &OptionList, base: CacheMode) -> CacheMode {
    let set = ["file.cache.direct", "cache.direct"]
        .iter()
        .find_map(|k| dict.get(k));
    match set {
        Some("on" | "true" | "yes") if !base.direct() => match base {
            CacheMode::Writethrough => CacheMode::DirectSync,
            _ => CacheMode::None,
        },
        Some("off" | "false" | "no") if base.direct() => match base {
            CacheMode::DirectSync => CacheMode::Writethrough,
            _ => CacheMode::Writeback,
        },
        _ => base,
    }
}

/// qemu's file-protocol checks: a directory cannot be opened for writing, and the `file`
/// driver takes regular files only, `host_device`/`host_cdrom` devices only.
fn check_protocol(protocol: &str, path: &str, read_only: bool) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let m = std::fs::metadata(path)
        .map_err(|e| anyhow!("Could not open '{path}': {}", crate::message(&e.into())))?;
    if !read_only && m.is_dir() {
        bail!("Could not open '{path}': Is a directory");
    }
    let t = m.file_type();
    match protocol {
        "file" if !t.is_file() => bail!("'file' driver requires '{path}' to be a regular file"),
        "host_device" | "host_cdrom" if !(t.is_block_device() || t.is_char_device()) => {
            bail!("'{protocol}' driver requires '{path}' to be either a character or block device")
        }
        _ => Ok(()),
    }
}

/// Opens what `r` names: `opts` carries secrets, read-only and backing choices (`r`'s
/// driver options are added to its own); `arg` is the name the user gave.
pub(crate) fn open(r: &Resolved, arg: &str, mut opts: ImageOptions) -> Result<Image> {
    let ro = opts.read_only;
    let image = |device: Arc<dyn BlockDevice>, format: Format| {
        Image::from_device(device, format, PathBuf::from(&r.path), arg.to_string())
    };
    match &r.node {
        Node::Null(size) => return Ok(image(Arc::new(NullDevice::new(*size)), Format::Raw)),
        Node::Nested(inner) => {
            let file = Arc::new(FileStorage::open(&r.path, ro)?);
            let inner = diskimg::open_storage(file, Some(*inner), ro)?;
            let dev = diskimg::open_storage(Arc::new(DeviceStorage::new(inner)), r.format, ro)?;
            let f = Format::from_name(dev.info().format).unwrap_or(Format::Raw);
            return Ok(image(dev, f));
        }
        Node::Quorum(children, threshold) => {
            let mut files: Vec<Arc<dyn diskimg::Storage>> = Vec::new();
            for c in children {
                files.push(Arc::new(FileStorage::open(c, ro)?));
            }
            let q = crate::quorum::QuorumStorage::new(files, *threshold)?;
            let dev = diskimg::open_storage(Arc::new(q), r.format, ro).map_err(|e| {
                // A descriptor naming other files (vmdk extents) has no directory here.
                if matches!(&e, diskimg::Error::BackingDenied { purpose, .. } if purpose.contains("extent")) {
                    anyhow!(
                        "Cannot use relative paths with VMDK descriptor file '{arg}': Cannot generate a base directory for quorum nodes"
                    )
                } else {
                    e.into()
                }
            })?;
            let f = Format::from_name(dev.info().format).unwrap_or(Format::Raw);
            // No directory: relative names under it cannot be resolved.
            return Ok(Image::from_device(dev, f, PathBuf::new(), arg.to_string()));
        }
        Node::File => {}
    }
    if let Some(p) = &r.protocol {
        check_protocol(p, &r.path, ro)?;
    }
    for (k, v) in r.driver_options.entries() {
        // A metadata-only open (qemu-img info) decrypts nothing: the secrets named need
        // not exist, as in qemu.
        if opts.metadata_only && k.ends_with("key-secret") {
            continue;
        }
        opts.driver_options.set(k, v);
    }
    opts.open_backing &= r.open_backing;
    if let Some(l) = r.locking {
        opts.locking = l;
    }
    opts.force_share |= r.force_share == Some(true);
    if r.file_debug.is_some() || r.data_debug.is_some() {
        opts.storage_hook = Some(debug_hook(r));
    }
    let mut img = diskimg::open(&r.path, r.format, &opts)?;
    if let Some((offset, size)) = r.raw_window {
        let window = RawWindow::new(img.device.clone(), offset, size)?;
        img.device = Arc::new(Filtered(window));
    }
    Ok(img)
}

/// Puts the blkdebug nodes below the format of `r` under the image's storages.
fn debug_hook(r: &Resolved) -> diskimg::StorageHook {
    let (file, data) = (r.file_debug.clone(), r.data_debug.clone());
    let align = r.file_align;
    diskimg::StorageHook(Arc::new(move |purpose, storage| {
        let (engine, align) = match purpose {
            None => (&file, align),
            Some(diskimg::blockio::FilePurpose::DataFile) => (&data, 0),
            Some(_) => (&None, 0),
        };
        match engine {
            Some(e) => Arc::new(BlkdebugStorage::new(storage, e.clone(), align)),
            None => storage,
        }
    }))
}
