//! Reading internal snapshots through the facade (`convert -l`).

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, Error, Result};

use crate::image::Image;

/// Which internal snapshot to read, as qemu-img's `-l` parameter names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSelector {
    /// `snapshot.id=ID`.
    pub id: Option<String>,
    /// `snapshot.name=NAME`.
    pub name: Option<String>,
    /// A bare `ID_OR_NAME` (ids are tried first, then names).
    pub id_or_name: Option<String>,
}

impl SnapshotSelector {
    /// Parses `snapshot.id=ID[,snapshot.name=NAME]`, `snapshot.name=NAME` or `ID_OR_NAME`.
    pub fn parse(s: &str) -> Result<Self> {
        let mut sel = SnapshotSelector::default();
        if !s.starts_with("snapshot.") {
            if s.is_empty() {
                return Err(Error::invalid("empty snapshot name"));
            }
            sel.id_or_name = Some(s.to_string());
            return Ok(sel);
        }
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("snapshot.id", v)) => sel.id = Some(v.to_string()),
                Some(("snapshot.name", v)) => sel.name = Some(v.to_string()),
                _ => {
                    return Err(Error::invalid(format!(
                        "Invalid snapshot parameter '{part}' (expected snapshot.id=… or snapshot.name=…)"
                    )));
                }
            }
        }
        Ok(sel)
    }
}

/// A read-only device showing `image` as it was when the selected snapshot was taken.
/// Only qcow2 has internal snapshots; other formats fail with `Unsupported`.
pub fn snapshot_device(image: &Image, sel: &SnapshotSelector) -> Result<Arc<dyn BlockDevice>> {
    let info = image.device.info();
    let found = info.snapshots.iter().find(|s| {
        let id_ok = sel.id.as_ref().is_none_or(|id| &s.id == id);
        let name_ok = sel.name.as_ref().is_none_or(|n| &s.name == n);
        let either_ok = sel
            .id_or_name
            .as_ref()
            .is_none_or(|x| &s.id == x || &s.name == x);
        id_ok && name_ok && either_ok
    });
    let Some(found) = found else {
        return Err(Error::invalid(format!(
            "Failed to load snapshot: Can't find snapshot {}",
            sel.id_or_name
                .as_deref()
                .or(sel.name.as_deref())
                .or(sel.id.as_deref())
                .unwrap_or("")
        )));
    };
    match image.device.as_snapshots() {
        // qemu-img's words for any failure to load it (`Failed to load snapshot: …`).
        Some(s) => s.open(&found.id).map_err(|e| match e {
            Error::Corrupt {
                format,
                what,
                offset,
            } => Error::Corrupt {
                format,
                what: format!("Failed to load snapshot: {what}").into(),
                offset,
            },
            e => e,
        }),
        None => Err(Error::unsupported(info.format, "internal snapshots")),
    }
}
