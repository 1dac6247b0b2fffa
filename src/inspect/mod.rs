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
mod signatures;
mod vdi;
mod vhd;
mod vhdx;
mod vmdk;

use std::path::Path;
use std::sync::Arc;

use diskimg_blockio::{Limits, Result, Storage};

use crate::format::Format;
use read::Image;

/// What [`inspect`] is told.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct InspectOptions {
    /// The format the caller expects (`-f`); content of another format is unsafe. Without
    /// it, the format is detected as qemu would probe it.
    pub format: Option<Format>,
    /// Table size bounds.
    pub limits: Limits,
}

impl InspectOptions {
    /// The declared format (see [`InspectOptions::format`]).
    pub fn with_format(mut self, format: Option<Format>) -> Self {
        self.format = format;
        self
    }

    /// The limits (see [`InspectOptions::limits`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// The answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing found that could make diskimg or qemu touch another host file or misread
    /// the image (exit 0).
    Safe,
    /// At least one [`Severity::Unsafe`] finding (exit 1).
    Unsafe,
    /// The image could not be judged (unreadable, a format without an inspector; exit 2).
    CannotTell,
}

impl Verdict {
    /// `safe`, `unsafe` or `cannot-tell`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Safe => "safe",
            Verdict::Unsafe => "unsafe",
            Verdict::CannotTell => "cannot-tell",
        }
    }
}

/// How much a finding weighs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Informational (encryption present, a VHD footer at the end of a raw image).
    Note,
    /// Prevents a verdict either way.
    CannotTell,
    /// Makes the image unsafe.
    Unsafe,
}

impl Severity {
    /// `note`, `cannot-tell` or `unsafe`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Note => "note",
            Severity::CannotTell => "cannot-tell",
            Severity::Unsafe => "unsafe",
        }
    }
}

/// One reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Its weight.
    pub severity: Severity,
    /// A stable identifier of the check (`backing-file`, `format-mismatch`, …; the list is
    /// in docs/security.md).
    pub check: &'static str,
    /// What was found, for a person.
    pub message: String,
}

/// A format signature found in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// What it is: a qemu format name (`qcow2`, `vmdk`, `vpc`, `vhdx`, `vdi`, `qcow`, `qed`,
    /// `luks`, `parallels`, `bochs`, `cloop`, `dmg`) or content (`iso9660`, `udf`, `gpt`,
    /// `mbr`, `vpc-footer`: a VHD footer at the end of the file).
    pub name: &'static str,
    /// Byte offset of the signature.
    pub offset: u64,
}

/// What a host-file reference is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceKind {
    /// A backing file (qcow2, VMDK parent).
    BackingFile,
    /// A qcow2 external data file.
    DataFile,
    /// A VMDK extent file.
    Extent,
    /// A VHD or VHDX parent locator entry.
    ParentLocator,
}

impl ReferenceKind {
    /// `backing-file`, `data-file`, `extent` or `parent-locator`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReferenceKind::BackingFile => "backing-file",
            ReferenceKind::DataFile => "data-file",
            ReferenceKind::Extent => "extent",
            ReferenceKind::ParentLocator => "parent-locator",
        }
    }
}

/// A name of another host file the image would make a reader open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// What for.
    pub kind: ReferenceKind,
    /// The name exactly as stored (lossily decoded to UTF-8).
    pub name: String,
    /// Details: the backing format, the extent type and access, the locator kind.
    pub detail: Option<String>,
}

/// Everything [`inspect`] found.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Report {
    /// The verdict (derived from the findings).
    pub verdict: Verdict,
    /// The format the image was inspected as: the declared one, else [`Report::detected`].
    pub format: String,
    /// The format qemu would probe (`raw` when no image format matches).
    pub detected: String,
    /// The format the caller declared, if any.
    pub declared: Option<String>,
    /// File length in bytes.
    pub file_size: u64,
    /// The virtual disk size the header claims, when the format has one.
    pub virtual_size: Option<u64>,
    /// Every signature found, in offset order.
    pub signatures: Vec<Signature>,
    /// Every host-file reference.
    pub references: Vec<Reference>,
    /// Every encryption scheme found (`qcow2 luks`, `qcow2 aes`, `luks`).
    pub encryption: Vec<String>,
    /// Unknown incompatible feature bits, named.
    pub unknown_features: Vec<String>,
    /// The reasons, in the order found.
    pub findings: Vec<Finding>,
}

impl Report {
    fn new(file_size: u64) -> Self {
        Self {
            verdict: Verdict::CannotTell,
            format: "raw".into(),
            detected: "raw".into(),
            declared: None,
            file_size,
            virtual_size: None,
            signatures: Vec::new(),
            references: Vec::new(),
            encryption: Vec::new(),
            unknown_features: Vec::new(),
            findings: Vec::new(),
        }
    }

    /// Records a host-file reference, which makes the image unsafe.
    pub(crate) fn reference(&mut self, kind: ReferenceKind, name: &str, detail: Option<String>) {
        let text = match &detail {
            Some(d) => format!("the image names {} '{name}' ({d})", kind_phrase(kind)),
            None => format!("the image names {} '{name}'", kind_phrase(kind)),
        };
        self.unsafe_(kind.as_str(), text);
        self.references.push(Reference {
            kind,
            name: name.to_string(),
            detail,
        });
    }

    /// Records an unknown incompatible feature, which makes the image unsafe.
    pub(crate) fn unknown_feature(&mut self, name: String) {
        self.unsafe_(
            "unknown-features",
            format!("unknown incompatible feature: {name}"),
        );
        self.unknown_features.push(name);
    }

    /// Records an encryption scheme (a note: encryption is no risk to the host).
    pub(crate) fn encrypted(&mut self, scheme: &str) {
        self.note("encryption", format!("the image is encrypted ({scheme})"));
        self.encryption.push(scheme.to_string());
    }

    fn settle(&mut self) {
        let worst = self.findings.iter().map(|f| f.severity).max();
        self.verdict = match worst {
            Some(Severity::Unsafe) => Verdict::Unsafe,
            Some(Severity::CannotTell) => Verdict::CannotTell,
            _ => Verdict::Safe,
        };
    }
}

fn kind_phrase(kind: ReferenceKind) -> &'static str {
    match kind {
        ReferenceKind::BackingFile => "a backing file",
        ReferenceKind::DataFile => "a data file",
        ReferenceKind::Extent => "an extent file",
        ReferenceKind::ParentLocator => "a parent",
    }
}

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
