//! Maintenance operations the CLI's `snapshot`, `commit`, `rebase`, `amend`, `measure`
//! and `bitmap` verbs need beyond reading and writing: each asks the device for the
//! capability ([`BlockDevice::as_snapshots`], [`BlockDevice::as_chain_link`], …) and
//! fails with [`Error::Unsupported`] (or qemu's wording) where the format lacks it.

use diskimg_blockio::{
    Amend, BitmapInfo, BlockDevice, ChainLink, Error, OptionList, Result, Secrets, Snapshots,
};
#[cfg(feature = "qcow2")]
use diskimg_blockio::{BitmapData, BitmapOp};

use crate::image::Image;

fn unsupported(image: &Image, what: &'static str) -> Error {
    Error::unsupported(image.device.info().format, what)
}

fn snapshots(image: &Image) -> Result<&dyn Snapshots> {
    image
        .device
        .as_snapshots()
        .ok_or_else(|| unsupported(image, "internal snapshots"))
}

fn chain_link<'a>(image: &'a Image, what: &'static str) -> Result<&'a dyn ChainLink> {
    image
        .device
        .as_chain_link()
        .ok_or_else(|| unsupported(image, what))
}

/// Takes an internal snapshot named `name` (`qemu-img snapshot -c`); returns its id.
pub fn create_snapshot(image: &Image, name: &str) -> Result<String> {
    snapshots(image)?.create(name)
}

/// Reverts the disk to the internal snapshot `id_or_name` (`qemu-img snapshot -a`).
pub fn apply_snapshot(image: &Image, id_or_name: &str) -> Result<()> {
    snapshots(image)?.apply(id_or_name)
}

/// Deletes the internal snapshot `id_or_name` (`qemu-img snapshot -d`).
pub fn delete_snapshot(image: &Image, id_or_name: &str) -> Result<()> {
    snapshots(image)?.delete(id_or_name)
}

/// What `qemu-img measure` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    /// File size needed for the content.
    pub required: u64,
    /// File size with every cluster allocated.
    pub fully_allocated: u64,
    /// Space for persistent bitmaps, when both the source and the target hold them.
    pub bitmaps: Option<u64>,
}

/// Measures the file size a `format` image created with `options` would need, either
/// empty of `size` bytes or (with `source`) holding `source`'s content as `convert` would
/// copy it. Only raw and qcow2 targets can be measured, as in qemu.
pub fn measure(
    source: Option<&dyn BlockDevice>,
    size: u64,
    format: crate::Format,
    options: &diskimg_blockio::OptionList,
) -> Result<Measure> {
    match format {
        crate::Format::Raw => {
            let mut o = options.clone();
            o.take("size");
            o.take("preallocation");
            o.finish("raw")?;
            let required = match source {
                Some(d) => d.virtual_size(),
                None => size.checked_next_multiple_of(512).unwrap_or(u64::MAX),
            };
            Ok(Measure {
                required,
                fully_allocated: required,
                bitmaps: None,
            })
        }
        #[cfg(feature = "qcow2")]
        crate::Format::Qcow2 => {
            let t = diskimg_qcow2::MeasureTarget::from_options(options)?;
            let Some(src) = source else {
                let m = t.measure(size, None)?;
                return Ok(Measure {
                    required: m.required,
                    fully_allocated: m.fully_allocated,
                    bitmaps: None,
                });
            };
            let vsize = src.virtual_size();
            let data = data_clusters_bytes(src, t.cluster_size)?;
            let m = t.measure(vsize, Some(data))?;
            let bitmaps = src.as_bitmaps().filter(|_| t.v3).map(|b| {
                let shapes: Vec<(usize, u64)> = b
                    .list()
                    .iter()
                    .map(|b| (b.name.len(), b.granularity))
                    .collect();
                diskimg_qcow2::bitmaps_size(vsize, t.cluster_size, &shapes)
            });
            Ok(Measure {
                required: m.required,
                fully_allocated: m.fully_allocated,
                bitmaps,
            })
        }
        f => Err(Error::unsupported(
            f.name(),
            format!(
                "Block driver '{}' does not support size measurement",
                f.name()
            ),
        )),
    }
}

/// Bytes of the `cs`-sized clusters of `dev` (its whole chain) holding any data.
#[cfg(feature = "qcow2")]
fn data_clusters_bytes(dev: &dyn BlockDevice, cs: u64) -> Result<u64> {
    let size = dev.virtual_size();
    let mut total = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let e = diskimg_blockio::block_status(dev, pos, size - pos)?;
        let end = pos.saturating_add(e.length.max(1)).min(size);
        if e.data && !e.zero {
            // As qemu: count from the start of the cluster, up to the end of the last.
            let to = end.checked_next_multiple_of(cs).unwrap_or(u64::MAX);
            total = total.saturating_add(to - pos / cs * cs);
            pos = to.min(size);
        } else {
            pos = end;
        }
    }
    Ok(total)
}

/// Rewrites the image's backing file reference (`qemu-img rebase -u`): `name` (empty or
/// `None`: no backing file) with backing format `format`. Only qcow2 can do this.
pub fn set_backing_file(image: &Image, name: Option<&str>, format: Option<&str>) -> Result<()> {
    chain_link(image, "changing the backing file")?.set_backing_file(name, format)
}

/// Empties the image so that it reads through to its backing file again (what
/// `qemu-img commit` does to the top image unless `-d`).
pub fn make_empty(image: &Image) -> Result<()> {
    chain_link(image, "emptying an image")?.make_empty()
}

/// After a commit copied `child`'s data into its backing image `parent`, records the
/// parent's new state in the child where the format links the two by it (a VHDX child's
/// `parent_linkage` names the parent's `DataWriteGuid`, which the commit's writes renewed):
/// the child, whose data still overrides the parent's, stays openable. Other formats: no-op.
pub fn relink_after_commit(child: &dyn BlockDevice, parent: &dyn BlockDevice) -> Result<()> {
    match child.as_chain_link() {
        Some(c) => c.relink_parent(parent),
        None => Ok(()),
    }
}

/// The image's [`Amend`] capability, or qemu's refusal for formats without one.
pub fn amender(image: &Image) -> Result<&dyn Amend> {
    image.device.as_amend().ok_or_else(|| {
        let format = image.device.info().format;
        Error::unsupported(
            format,
            format!("Format driver '{format}' does not support option amendment"),
        )
    })
}

/// Applies `qemu-img amend -o` options ([`Amend::amend`]; `secrets` for key-slot
/// options). Only qcow2 supports amendment (qemu's wording otherwise).
pub fn amend(image: &Image, options: &OptionList, secrets: &Secrets) -> Result<()> {
    amender(image)?.amend(options, secrets)
}

/// [`amend`] with qemu-img amend's `--force` ([`Amend::amend_forced`]).
pub fn amend_forced(
    image: &Image,
    options: &OptionList,
    secrets: &Secrets,
    force: bool,
) -> Result<()> {
    amender(image)?.amend_forced(options, secrets, force)
}

/// [`amend_forced`] reporting progress ([`Amend::amend_with_progress`]:
/// `progress(done, total)`, qemu's amend status callback).
pub fn amend_with_progress(
    image: &Image,
    options: &OptionList,
    secrets: &Secrets,
    force: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    amender(image)?.amend_with_progress(options, secrets, force, progress)
}

/// Applies `qemu-img bitmap` operations to bitmap `name` of the qcow2 image at `path`
/// (opened read-write on its own, without its backing chain).
#[cfg(feature = "qcow2")]
pub fn edit_bitmaps(
    path: &std::path::Path,
    format: Option<crate::Format>,
    name: &str,
    ops: &[BitmapOp],
) -> Result<()> {
    let storage = diskimg_blockio::FileStorage::open(path, false)?;
    // Written like any writable open: qemu's lock bytes first.
    storage.lock(
        diskimg_blockio::lock::LockPerms::format_file(true, false),
        &path.to_string_lossy(),
    )?;
    let (done, closed) = edit_bitmaps_on(
        std::sync::Arc::new(storage),
        &path.to_string_lossy(),
        format,
        name,
        ops,
    );
    done.and(closed)
}

/// [`edit_bitmaps`] on the image `image` names: a file, or a `json:{…}` name (the
/// format on its file, under `raw` `offset`/`size` windows and the filter nodes of
/// `drivers`), as qemu-img's other verbs open them.
#[cfg(feature = "qcow2")]
pub fn edit_bitmaps_named(
    image: &str,
    format: Option<crate::Format>,
    drivers: &crate::NodeDrivers,
    name: &str,
    ops: &[BitmapOp],
) -> Result<()> {
    let (done, closed) = edit_bitmaps_named_then_close(image, format, drivers, name, ops);
    done.and(closed)
}

/// [`edit_bitmaps_named`] with the two results apart: the operations' (the open's, or
/// the first failing operation's error) and the close's (storing the bitmaps), as
/// `qemu-img bitmap` reports both.
#[cfg(feature = "qcow2")]
pub fn edit_bitmaps_named_then_close(
    image: &str,
    format: Option<crate::Format>,
    drivers: &crate::NodeDrivers,
    name: &str,
    ops: &[BitmapOp],
) -> (Result<()>, Result<()>) {
    match bitmap_file(image, drivers, false) {
        Ok((storage, named)) => edit_bitmaps_on(storage, image, format.or(named), name, ops),
        Err(e) => (Err(e), Ok(())),
    }
}

/// The storage (and named format) of the image `image` names for a bitmap operation:
/// the file, under the nodes of a `json:{…}` name; locked as qemu locks it when
/// writable (a read-only merge source is read unlocked).
#[cfg(feature = "qcow2")]
pub fn bitmap_file(
    image: &str,
    drivers: &crate::NodeDrivers,
    read_only: bool,
) -> Result<(
    std::sync::Arc<dyn diskimg_blockio::Storage>,
    Option<crate::Format>,
)> {
    let node = match image.starts_with("json:") {
        true => Some(crate::jsonname::backing_node(image, drivers)?),
        false => None,
    };
    let path = node.as_ref().map_or(image, |n| n.path.as_str());
    let file = diskimg_blockio::FileStorage::open(path, read_only)?;
    if !read_only {
        // Written like any writable open: qemu's lock bytes first.
        file.lock(
            diskimg_blockio::lock::LockPerms::format_file(true, false),
            path,
        )?;
    }
    let file: std::sync::Arc<dyn diskimg_blockio::Storage> = std::sync::Arc::new(file);
    Ok(match node {
        Some(n) => (n.wrap(file), n.format),
        None => (file, None),
    })
}

#[cfg(feature = "qcow2")]
fn edit_bitmaps_on(
    storage: std::sync::Arc<dyn diskimg_blockio::Storage>,
    shown: &str,
    format: Option<crate::Format>,
    name: &str,
    ops: &[BitmapOp],
) -> (Result<()>, Result<()>) {
    let format = match format {
        Some(f) => f,
        None => crate::probe(storage.as_ref()),
    };
    if format != crate::Format::Qcow2 {
        let op = ops.first().map_or("add", BitmapOp::verb);
        let e = Err(Error::unsupported(
            format.name(),
            format!(
                "Operation {op} on bitmap {name} failed: Can't store persistent bitmaps to {shown}: \
                 Operation not supported"
            ),
        ));
        return (e, Ok(()));
    }
    diskimg_qcow2::edit_bitmaps_then_close(storage, name, ops)
}

/// The stored bits of bitmap `name` of the qcow2 image on `storage` (opened read-only on
/// its own, as `qemu-img bitmap --merge SRC -b FILE` reads its source).
#[cfg(feature = "qcow2")]
pub fn read_bitmap(
    storage: std::sync::Arc<dyn diskimg_blockio::Storage>,
    name: &str,
) -> Result<BitmapData> {
    let (granularity, bits) = diskimg_qcow2::read_bitmap(storage, name)?;
    Ok(BitmapData { granularity, bits })
}

/// The persistent bitmaps of `src` that `convert --bitmaps` copies (none when the image
/// cannot hold any).
pub fn bitmaps_of(src: &dyn BlockDevice) -> Vec<BitmapInfo> {
    src.as_bitmaps().map(|b| b.list()).unwrap_or_default()
}

/// Copies persistent bitmap `bitmap` of `src` into the image at `dst` (`convert
/// --bitmaps`): a new bitmap of the same name, granularity and state holding the same
/// bits. The caller decides what to do with bitmaps marked in use.
#[cfg(feature = "qcow2")]
pub fn copy_bitmap(
    src: &dyn BlockDevice,
    bitmap: &BitmapInfo,
    dst: &std::path::Path,
    dst_format: crate::Format,
) -> Result<()> {
    let BitmapData { granularity, bits } = src
        .as_bitmaps()
        .ok_or_else(|| Error::unsupported(src.info().format, "persistent bitmaps"))?
        .read(&bitmap.name)?;
    let ops = [
        BitmapOp::Add {
            granularity: Some(granularity),
            enabled: bitmap.auto,
        },
        BitmapOp::MergeBits { granularity, bits },
    ];
    edit_bitmaps(dst, Some(dst_format), &bitmap.name, &ops)
}
