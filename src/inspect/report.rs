//! The answer of [`inspect`](super::inspect): the [`Report`], its [`Finding`]s and
//! [`Verdict`], and the [`InspectOptions`] it is asked with. The format inspectors fill
//! a report; `mod.rs` runs them.

use diskimg_blockio::Limits;

use crate::format::Format;

/// What [`inspect`](fn@crate::inspect) is told.
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

/// Everything [`inspect`](fn@crate::inspect) found.
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
    pub(super) fn new(file_size: u64) -> Self {
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

    pub(super) fn settle(&mut self) {
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
