//! Which image of a backing chain fails to open, as `qemu-img info --backing-chain`
//! reports it: qemu opens each image of the chain by itself, so a backing file that does
//! not open is reported under its own name (`Could not open 'foo:bar': Unknown protocol
//! 'foo'`, `Could not open 'b.raw': Could not open 'b.raw': No such file or directory`),
//! not as a failure of the top image.
//!
//! The layers are opened under the chain's own rules: a backing file the open policy
//! refuses (a FIFO, a socket, a character device, a directory) is never opened here, by
//! name or otherwise; the chain's refusal is the answer, at once.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use anyhow::Result;
use diskimg::blockio::FilePurpose;
use diskimg::{Error, Format, Image, OpenPolicy};

use crate::common::full_backing_name;

/// The error to report for `file`, whose chain failed to open with `err`: the error of
/// the first layer that does not open by itself, or `err` when every layer does, when
/// the chain loops, when a policy refused a file, or for names only the chain reads
/// (`json:{…}` names, VHD parent locators).
pub(crate) fn chain_failure(
    file: &str,
    format: Option<Format>,
    err: anyhow::Error,
) -> anyhow::Error {
    let chain_only = crate::errmap::is_chain_refusal(&err);
    if chain_only {
        return err;
    }
    // Only a host file is opened again (not a stream, which was read).
    let host = std::fs::metadata(crate::names::host_path(file));
    if !host.is_ok_and(|m| m.is_file() || m.file_type().is_block_device()) {
        return err;
    }
    let Ok(mut img) = crate::common::open_image(file, format, true, false) else {
        return err;
    };
    let mut name = crate::names::shown(file, false);
    for _ in 0..OpenPolicy::qemu_compatible().max_chain_depth {
        let Some(b) = img.device.info().backing else {
            break;
        };
        if b.filename.is_empty() || !b.alternates.is_empty() {
            break;
        }
        name = full_backing_name(&name, &b.filename);
        if crate::imgspec::is_spec(&name) {
            break;
        }
        let fmt = b.format.as_deref().and_then(|f| Format::from_name(f).ok());
        img = match open_layer(&name, fmt) {
            Ok(Some(i)) => i,
            Ok(None) => break,
            Err(e) => return e,
        };
    }
    err
}

/// Opens the backing image `name` (its name as qemu combines it with its image's) by
/// itself, read-only and without its own backing file: `Ok(None)` when the open policy
/// refuses the file it resolves to (the chain's error says so), never a read of a FIFO.
fn open_layer(name: &str, format: Option<Format>) -> Result<Option<Image>> {
    crate::names::check_protocol(name, false)
        .map_err(|e| e.context(format!("Could not open '{name}'")))?;
    let path = crate::names::host_path(name);
    let policy = OpenPolicy::qemu_compatible();
    // Judged as the chain judges it: by the real file and its kind.
    if let Err(Error::BackingDenied { .. }) =
        policy.resolve(FilePurpose::Backing, Path::new("."), &path)
    {
        return Ok(None);
    }
    let (_, format, opts) = crate::secrets::resolve("", format)?;
    crate::common::open_resolved(name, &path, format, opts, true, false).map(Some)
}
