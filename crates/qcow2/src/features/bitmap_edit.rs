//! `qemu-img bitmap` on a qcow2 image ([`edit_bitmaps`]): as qemu-img, the image is
//! opened read-write (every consistent bitmap loaded and marked `in_use`,
//! [`crate::features::dirty`]), the operations change the bitmaps in memory (`remove`
//! rewrites the directory at once, as qemu's `qcow2_co_remove_persistent_dirty_bitmap`)
//! and closing the image stores every bitmap anew. So an image with little room fails
//! where qemu-img fails, and a failed store leaves what qemu leaves.

use std::sync::Arc;

use diskimg_blockio::{BitmapOp, OpenOptions, Result, Storage};

use crate::device::Qcow2Device;
use crate::engine::meta::Meta;
use crate::features::bitmap::{failed, read_directory, table_clusters, write_directory};
use crate::tracked::Tracked;

/// Applies `ops` (in order) to bitmap `name` of the qcow2 image on `file`, as
/// `qemu-img bitmap` does; the bitmaps are stored when the image closes, also after a
/// failed operation (as qemu-img's), whose error is returned then.
pub fn edit_bitmaps(file: Arc<dyn Storage>, name: &str, ops: &[BitmapOp]) -> Result<()> {
    let (done, closed) = edit_bitmaps_then_close(file, name, ops);
    done.and(closed)
}

/// [`edit_bitmaps`] with the two results apart: the operations' (the open's, or the
/// first failing operation's error) and the close's (storing the bitmaps), for callers
/// that report both as qemu-img does.
pub fn edit_bitmaps_then_close(
    file: Arc<dyn Storage>,
    name: &str,
    ops: &[BitmapOp],
) -> (Result<()>, Result<()>) {
    let dev = match Qcow2Device::open(file, &OpenOptions::new()) {
        Ok(dev) => dev,
        Err(e) => return (Err(e), Ok(())),
    };
    if let Err(e) = dev.writable() {
        return (Err(e), Ok(()));
    }
    let mut done = Ok(());
    for op in ops {
        done = apply(&dev, name, op);
        if done.is_err() {
            break;
        }
    }
    (done, dev.close())
}

/// The bitmaps of an image being edited: those held in memory and the directory's
/// (for the inconsistent ones, which are not held).
struct Bitmaps<'a> {
    held: &'a mut Vec<Tracked>,
    on_disk: Vec<String>,
}

impl Bitmaps<'_> {
    fn exists(&self, name: &str) -> bool {
        self.held.iter().any(|t| t.name == name) || self.on_disk.iter().any(|n| n == name)
    }

    /// The held bitmap `name` for `op`: qemu's refusals for one it does not know and
    /// for an inconsistent one (`in_use` at open).
    fn usable(&mut self, op: &str, dst: &str, name: &str) -> Result<&mut Tracked> {
        if !self.exists(name) {
            return Err(failed(
                op,
                dst,
                format_args!("Dirty bitmap '{name}' not found"),
            ));
        }
        self.held
            .iter_mut()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                failed(
                    op,
                    dst,
                    format_args!(
                        "Bitmap '{name}' is inconsistent and cannot be used\n\
                         Try block-dirty-bitmap-remove to delete this bitmap from disk"
                    ),
                )
            })
    }
}

/// Applies one operation to bitmap `name` of `dev`.
fn apply(dev: &Qcow2Device, name: &str, op: &BitmapOp) -> Result<()> {
    let mut m = dev.lock();
    let mut held = dev.tracked.lock().unwrap_or_else(|e| e.into_inner());
    let on_disk = read_directory(&m)?.into_iter().map(|e| e.name).collect();
    let mut b = Bitmaps {
        held: &mut held,
        on_disk,
    };
    let verb = op.verb();
    match op {
        BitmapOp::Add {
            granularity,
            enabled,
        } => {
            if b.exists(name) {
                return Err(failed(
                    verb,
                    name,
                    format_args!("Bitmap already exists: {name}"),
                ));
            }
            let granularity = check_new(&m, name, *granularity)?;
            let t = Tracked::new(name, granularity, *enabled, m.size(), m.cs());
            b.held.push(t);
        }
        BitmapOp::Remove => {
            if !b.exists(name) {
                return Err(failed(
                    verb,
                    name,
                    format_args!("Dirty bitmap '{name}' not found"),
                ));
            }
            b.held.retain(|t| t.name != name);
            remove_stored(&mut m, name)?;
        }
        BitmapOp::Clear => b.usable(verb, name, name)?.clear(),
        BitmapOp::Enable => b.usable(verb, name, name)?.enabled = true,
        BitmapOp::Disable => b.usable(verb, name, name)?.enabled = false,
        BitmapOp::Merge(source) => {
            b.usable(verb, name, name)?;
            let src = b.usable(verb, name, source)?.clone();
            b.usable(verb, name, name)?.merge_from(m.size(), &src);
        }
        BitmapOp::MergeBits { granularity, bits } => {
            b.usable(verb, name, name)?
                .merge(m.size(), bits, *granularity);
        }
    }
    Ok(())
}

/// `add`'s refusals (qemu's words); the granularity (default: the cluster size).
fn check_new(m: &Meta, name: &str, granularity: Option<u64>) -> Result<u64> {
    if m.h().version < 3 {
        return Err(failed(
            "add",
            name,
            "Cannot store dirty bitmaps in qcow2 v2 files",
        ));
    }
    let g = granularity.unwrap_or(m.cs());
    if !g.is_power_of_two() || g < 512 {
        return Err(failed(
            "add",
            name,
            "Granularity must be power of 2 and at least 512",
        ));
    }
    if !(512..=1u64 << 31).contains(&g) || name.is_empty() || name.len() > 1023 {
        return Err(failed("add", name, "Invalid bitmap parameters"));
    }
    Ok(g)
}

/// Removes bitmap `name` from the directory (a new one) and frees its clusters; nothing
/// to do for a bitmap not stored yet.
fn remove_stored(m: &mut Meta, name: &str) -> Result<()> {
    let mut dir = read_directory(m)?;
    let Some(pos) = dir.iter().position(|e| e.name == name) else {
        return Ok(());
    };
    let e = dir.remove(pos);
    let free = table_clusters(m, &e)?;
    write_directory(m, &dir).map_err(|e| {
        failed(
            "remove",
            name,
            format_args!("Failed to update bitmap extension: {e}"),
        )
    })?;
    for (o, l) in free {
        m.unref_range(o, l)?;
    }
    m.file().flush()
}
