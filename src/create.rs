//! Creating images: option checks, the size from a backing file, host hints and the
//! `file` protocol's preallocation.

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{
    CacheMode, CreateRequest, Error, FILE_CREATE_OPTIONS, FilePurpose, FileStorage, OptionList,
    Preallocation, Result, Storage,
};

use crate::format::Format;
use crate::hostfile::PolicyFiles;
use crate::image::{ImageOptions, dir_of, open};
use crate::locking::{HeldLocks, LockMode};
use crate::policy::{OpenPolicy, PathRule};

/// Creates an image at `path` (overwriting it) of `size` bytes, rounded up to whole
/// 512-byte sectors as qemu-img does for every format, with qemu-style `options`
/// (`cluster_size`, `backing_file`, `backing_fmt`, `subformat`, …). The format crates'
/// typed options (`diskimg_qcow2::Qcow2CreateOptions`, `diskimg_raw::RawCreateOptions`,
/// `diskimg_vdi::VdiCreateOptions`, …) turn into such lists with their `to_options`.
///
/// Without `size`, a `backing_file` option supplies it (the backing image is opened
/// through `image_options.policy`). A backing file needs `backing_fmt`, as in qemu-img 10.
/// Unknown options are refused before anything is written, naming the key.
pub fn create(
    path: impl AsRef<Path>,
    format: Format,
    size: Option<u64>,
    mut options: OptionList,
    image_options: &ImageOptions,
) -> Result<()> {
    let path = path.as_ref();
    let driver = format.driver()?;
    let specs = driver.create_options();
    for (k, _) in options.entries() {
        if !specs.iter().chain(FILE_CREATE_OPTIONS).any(|s| s.name == k) {
            return Err(Error::invalid(format!(
                "Invalid parameter '{k}' for file format '{}'",
                format.name()
            )));
        }
    }
    take_host_hints(&mut options)?;
    let size = match (options.take_size("size")?, size) {
        (_, Some(s)) | (Some(s), None) => Some(s),
        (None, None) => None,
    };
    let backing = options.get("backing_file").map(str::to_string);
    if let Some(b) = backing.as_deref().filter(|b| !b.is_empty())
        && options.get("backing_fmt").is_none()
    {
        return Err(Error::invalid(format!(
            "Backing file specified without backing format\nDetected format of {b}."
        )));
    }
    let size = match (size, backing.as_deref()) {
        (Some(s), _) => s,
        (None, Some(b)) if !b.is_empty() => {
            let dir = dir_of(path);
            let bpath = image_options
                .policy
                .resolve(FilePurpose::Backing, &dir, b)?;
            let bfmt = options
                .get("backing_fmt")
                .map(Format::from_name)
                .transpose()?;
            let opts = ImageOptions {
                read_only: true,
                ..image_options.clone()
            };
            open(&bpath, bfmt, &opts)?.device.virtual_size()
        }
        _ => return Err(Error::invalid("Image creation needs a size parameter")),
    };
    // As qemu-img (and the CLI), every format gets a size in whole sectors.
    let size = size
        .checked_next_multiple_of(512)
        .ok_or(Error::invalid("Image size too large"))?;
    let lock_mode = LockMode::of(image_options.locking, false, false)?;
    let storage: Arc<dyn Storage> = Arc::new(if lock_mode.is_some() {
        FileStorage::create_locked(path, &path.to_string_lossy())?
    } else {
        FileStorage::create(path)?
    });
    let files = Arc::new(PolicyFiles {
        dir: dir_of(path),
        policy: OpenPolicy {
            extents: PathRule::Beside,
            ..image_options.policy
        },
        read_only: false,
        cache: CacheMode::Writeback,
        #[cfg(target_os = "linux")]
        io_uring: None,
        defer_data_files: false,
        lock_mode,
        locks: HeldLocks::default(),
        hook: None,
        drivers: image_options.node_drivers.clone(),
        user_options: true,
    });
    let mut req = CreateRequest::new(size, options).files(files);
    if let Some(name) = path.file_name() {
        req = req.image_name(name.to_string_lossy());
    }
    if let Ok(dir) = std::fs::canonicalize(dir_of(path)) {
        req = req.image_dir(dir);
    }
    req.limits = image_options.limits;
    req.secrets = image_options.secrets.clone();
    let result = driver
        .create(storage.clone(), &mut req)
        .and_then(|()| file_preallocation(storage.as_ref(), &mut req.options))
        .and_then(|()| std::mem::take(&mut req.options).finish(format.name()));
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Validates and drops the `file` protocol's host hints (`extent_size_hint`, `nocow`), as
/// qemu-img accepts them for every format; applying them needs ioctls, so they are not.
fn take_host_hints(options: &mut OptionList) -> Result<()> {
    if let Some(hint) = options.take_size("extent_size_hint")?
        && hint > u64::from(u32::MAX)
    {
        return Err(Error::invalid("Extent size hint is too large"));
    }
    options.take_bool("nocow")?;
    Ok(())
}

/// The `file` protocol's `preallocation` for formats without their own (vhdx): after the
/// format wrote the image, the holes of the file are allocated (falloc) or written with
/// zeroes (full); data is not touched. (qemu preallocates the file at the virtual size
/// before the format driver writes, which can leave the file longer.)
fn file_preallocation(storage: &dyn Storage, options: &mut OptionList) -> Result<()> {
    let mode = match options.take("preallocation") {
        None => return Ok(()),
        Some(v) => Preallocation::parse_file(&v)?,
    };
    if mode == Preallocation::Off {
        return Ok(());
    }
    let len = storage.len()?;
    let mut pos = 0;
    while pos < len {
        let hole = storage.next_hole(pos)?;
        if hole >= len {
            break;
        }
        let data = storage.next_data(hole)?.unwrap_or(len).clamp(hole + 1, len);
        storage.preallocate(hole, data - hole, mode)?;
        pos = data;
    }
    storage.flush()
}
