//! Maintenance operations the CLI's `snapshot`, `commit`, `rebase` and `amend` verbs
//! need beyond the [`BlockDevice`] trait: they reach the format's own API (qcow2 only
//! today) and fail with [`Error::Unsupported`] for other formats.

use diskimg_blockio::{BlockDevice, Error, Result};

use crate::image::Image;

/// The qcow2 device behind `dev`, if it is one.
#[cfg(feature = "qcow2")]
pub fn as_qcow2(dev: &dyn BlockDevice) -> Option<&diskimg_qcow2::Qcow2Device> {
    dev.as_any().downcast_ref::<diskimg_qcow2::Qcow2Device>()
}

fn unsupported(image: &Image, what: &'static str) -> Error {
    Error::unsupported(image.device.info().format, what)
}

/// Takes an internal snapshot named `name` (`qemu-img snapshot -c`); returns its id.
pub fn create_snapshot(image: &Image, name: &str) -> Result<String> {
    #[cfg(feature = "qcow2")]
    if let Some(q) = as_qcow2(image.device.as_ref()) {
        return q.create_snapshot(name);
    }
    let _ = name;
    Err(unsupported(image, "internal snapshots"))
}

/// Reverts the disk to the internal snapshot `id_or_name` (`qemu-img snapshot -a`).
pub fn apply_snapshot(image: &Image, id_or_name: &str) -> Result<()> {
    #[cfg(feature = "qcow2")]
    if let Some(q) = as_qcow2(image.device.as_ref()) {
        return q.apply_snapshot(id_or_name);
    }
    let _ = id_or_name;
    Err(unsupported(image, "internal snapshots"))
}

/// Deletes the internal snapshot `id_or_name` (`qemu-img snapshot -d`).
pub fn delete_snapshot(image: &Image, id_or_name: &str) -> Result<()> {
    #[cfg(feature = "qcow2")]
    if let Some(q) = as_qcow2(image.device.as_ref()) {
        return q.delete_snapshot(id_or_name);
    }
    let _ = id_or_name;
    Err(unsupported(image, "internal snapshots"))
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
            let bitmaps = as_qcow2(src)
                .filter(|q| t.v3 && q.supports_bitmaps())
                .map(|q| diskimg_qcow2::bitmaps_size(vsize, t.cluster_size, &q.bitmap_shapes()));
            Ok(Measure {
                required: m.required,
                fully_allocated: m.fully_allocated,
                bitmaps,
            })
        }
        f => Err(Error::invalid(format!(
            "Block driver '{}' does not support size measurement",
            f.name()
        ))),
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
    #[cfg(feature = "qcow2")]
    if let Some(q) = as_qcow2(image.device.as_ref()) {
        return q.set_backing_file(name, format);
    }
    let _ = (name, format);
    Err(unsupported(image, "changing the backing file"))
}

/// Empties the image so that it reads through to its backing file again (what
/// `qemu-img commit` does to the top image unless `-d`).
pub fn make_empty(image: &Image) -> Result<()> {
    #[cfg(feature = "qcow2")]
    if let Some(q) = as_qcow2(image.device.as_ref()) {
        return q.make_empty();
    }
    Err(unsupported(image, "emptying an image"))
}

/// After a commit copied `child`'s data into its backing image `parent`, records the
/// parent's new state in the child where the format links the two by it (a VHDX child's
/// `parent_linkage` names the parent's `DataWriteGuid`, which the commit's writes renewed):
/// the child, whose data still overrides the parent's, stays openable. Other formats: no-op.
pub fn relink_after_commit(child: &dyn BlockDevice, parent: &dyn BlockDevice) -> Result<()> {
    #[cfg(feature = "vhdx")]
    if let (Some(c), Some(p)) = (
        child.as_any().downcast_ref::<diskimg_vhdx::VhdxDevice>(),
        parent.as_any().downcast_ref::<diskimg_vhdx::VhdxDevice>(),
    ) && c.subformat() == "differencing"
    {
        return c.relink_parent(p);
    }
    let _ = (child, parent);
    Ok(())
}

/// Applies `qemu-img amend -o` options. Only qcow2 supports amendment (qemu's wording
/// otherwise).
pub fn amend(image: &Image, options: &diskimg_blockio::OptionList) -> Result<()> {
    #[cfg(feature = "qcow2")]
    if let Some(q) = as_qcow2(image.device.as_ref()) {
        return q.amend(options);
    }
    let _ = options;
    Err(Error::invalid(format!(
        "Format driver '{}' does not support option amendment",
        image.device.info().format
    )))
}

/// Applies `qemu-img bitmap` operations to bitmap `name` of the qcow2 image at `path`
/// (opened read-write on its own, without its backing chain).
#[cfg(feature = "qcow2")]
pub fn edit_bitmaps(
    path: &std::path::Path,
    format: Option<crate::Format>,
    name: &str,
    ops: &[diskimg_qcow2::BitmapOp],
) -> Result<()> {
    let storage = std::sync::Arc::new(diskimg_blockio::FileStorage::open(path, false)?);
    let format = match format {
        Some(f) => f,
        None => crate::probe(storage.as_ref()),
    };
    // Written like any writable open: qemu's lock bytes first.
    storage.lock(
        diskimg_blockio::lock::LockPerms::format_file(true, false),
        &path.to_string_lossy(),
    )?;
    if format != crate::Format::Qcow2 {
        let op = match ops.first() {
            Some(diskimg_qcow2::BitmapOp::Add { .. }) | None => "add",
            Some(diskimg_qcow2::BitmapOp::Remove) => "remove",
            Some(diskimg_qcow2::BitmapOp::Clear) => "clear",
            Some(diskimg_qcow2::BitmapOp::Enable) => "enable",
            Some(diskimg_qcow2::BitmapOp::Disable) => "disable",
            Some(diskimg_qcow2::BitmapOp::Merge(_) | diskimg_qcow2::BitmapOp::MergeBits { .. }) => {
                "merge"
            }
        };
        return Err(Error::invalid(format!(
            "Operation {op} on bitmap {name} failed: Can't store persistent bitmaps to {}: \
             Operation not supported",
            path.display()
        )));
    }
    diskimg_qcow2::edit_bitmaps(storage, name, ops)
}
