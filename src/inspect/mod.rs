//! Inspecting an untrusted image before anything else touches it.
//!
//! [`inspect`] reads **only the image's own bytes** (it never opens a backing file, data
//! file, extent or parent, and never follows a name) and returns a [`Report`] whose
//! [`Verdict`] says whether the image is safe to hand to diskimg *or qemu* as the format
//! it was detected as (or declared with [`InspectOptions::format`]):
//!
//! - every format signature present: qcow2, qcow (v1), QED, VMDK (sparse, COWD, text
//!   descriptor), VHD (header and footer), VHDX, VDI, LUKS, Parallels, Bochs, cloop and
//!   DMG images, plus ISO 9660/UDF, GPT and MBR content. An image format hidden in another
//!   (a qcow2 header in the system area of an ISO), or content that does not match the
//!   declared format, is unsafe: a later tool that probes would see something else
//!   (CVE-2024-40767, CVE-2026-24708);
//! - every host-file reference, named: backing files and their format, qcow2 data files,
//!   VMDK extents of every type (also in a descriptor embedded in a sparse header), VHD and
//!   VHDX parent locators of every kind;
//! - encryption headers (noted, not unsafe) and unknown incompatible feature bits (unsafe);
//! - structure: tables inside the file, not overlapping each other or the headers, sizes
//!   within [`Limits`], no metadata pointing outside the file; plus the exact rules of
//!   OpenStack's `format_inspector` for each format (docs/security.md lists them).
//!
//! The cost is bounded by the file: every table is read once, only if it lies inside the
//! file and within [`Limits::max_metadata_bytes`].
//!
//! ```
//! use diskimg::{create, inspect, Format, ImageOptions, InspectOptions, OptionList, Verdict};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.qcow2");
//! create(&path, Format::Qcow2, Some(1 << 20), OptionList::new(), &ImageOptions::default())?;
//! let report = inspect(&path, &InspectOptions::default())?;
//! assert_eq!(report.verdict, Verdict::Safe);
//! assert_eq!(report.format, "qcow2");
//! // Declared as raw, a qcow2 is unsafe: a tool that probes would read it as qcow2.
//! let raw = InspectOptions::default().with_format(Some(Format::Raw));
//! assert_eq!(inspect(&path, &raw)?.verdict, Verdict::Unsafe);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod driver;
mod qcow2;
mod read;
mod report;
mod signatures;
mod vdi;
mod vhd;
mod vhdx;
mod vmdk;

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{Result, Storage};

use crate::format::Format;
use read::Image;
pub use report::{
    Finding, InspectOptions, Reference, ReferenceKind, Report, Severity, Signature, Verdict,
};

/// Inspects the image at `path`, opening nothing but that file (read-only,
/// non-blocking; a FIFO, socket, directory or character device is refused).
///
/// Errors only when the file cannot be opened; everything about its content is in the
/// [`Report`].
pub fn inspect(path: impl AsRef<Path>, options: &InspectOptions) -> Result<Report> {
    let storage =
        crate::hostfile::open_file(path.as_ref(), true, crate::SpecialFiles::BlockDevices, None)?;
    Ok(inspect_storage(Arc::new(storage), options))
}

/// Inspects an image held in any [`Storage`]; see [`inspect`]. Nothing is written.
pub fn inspect_storage(storage: Arc<dyn Storage>, options: &InspectOptions) -> Report {
    let len = match storage.len() {
        Ok(l) => l,
        Err(e) => {
            let mut r = Report::new(0);
            r.unknown("read", format!("the image's length could not be read: {e}"));
            r.settle();
            return r;
        }
    };
    let img = Image::new(storage.as_ref(), len, options.limits);
    let mut r = Report::new(len);
    let probed = signatures::scan(&img, &mut r);
    r.detected = probed.to_string();
    let format = match options.format {
        Some(f) => {
            r.declared = Some(f.name().to_string());
            let fixed_vhd = f == Format::Vpc
                && probed == "raw"
                && r.signatures.iter().any(|s| s.name == "vpc-footer");
            if f.name() != probed && !fixed_vhd {
                r.unsafe_(
                    "format-mismatch",
                    format!(
                        "declared as {} but the content is {probed} (a tool that probes would \
                         open it as {probed})",
                        f.name()
                    ),
                );
            }
            f.name().to_string()
        }
        None => probed.to_string(),
    };
    r.format = format.clone();
    signatures::judge_mixture(&mut r, &format);
    by_format(&img, &mut r, &format);
    if format != probed && probed != "raw" {
        // What the content really is, and what it would make a probing tool open.
        let mut hidden = Report::new(len);
        by_format(&img, &mut hidden, probed);
        for f in hidden.findings {
            let message = format!("as {probed}: {}", f.message);
            r.add(f.severity, f.check, message);
        }
        r.references.extend(hidden.references);
        r.encryption.extend(hidden.encryption);
        r.unknown_features.extend(hidden.unknown_features);
    }
    if let Some(f) = options.format.or_else(|| Format::from_name(&format).ok()) {
        driver::cross_check(storage, f, options, &mut r);
    }
    r.settle();
    r
}

/// Runs the inspector of `format` (qemu's name).
fn by_format(img: &Image<'_>, r: &mut Report, format: &str) {
    match format {
        "qcow2" => qcow2::inspect(img, r),
        "vmdk" => vmdk::inspect(img, r),
        "vpc" => vhd::inspect(img, r),
        "vhdx" => vhdx::inspect(img, r),
        "vdi" => vdi::inspect(img, r),
        "raw" => signatures::inspect_raw(img, r),
        other => signatures::inspect_foreign(img, r, other),
    }
}
