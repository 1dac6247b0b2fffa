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
