//! The formats diskimg knows and the probe table.

use diskimg_blockio::{Driver, Error, Result, Storage};

/// A disk image format, named as qemu names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// Raw bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk.
    Vmdk,
    /// VirtualBox disk image.
    Vdi,
    /// Hyper-V virtual hard disk v2.
    Vhdx,
    /// Virtual PC / Hyper-V VHD (qemu's `vpc`).
    Vpc,
    /// A LUKS1-encrypted raw disk (qemu's `luks`).
    Luks,
}

impl Format {
    /// Every format, in probe order.
    pub const ALL: [Format; 7] = [
        Format::Qcow2,
        Format::Vmdk,
        Format::Vdi,
        Format::Vhdx,
        Format::Vpc,
        Format::Luks,
        Format::Raw,
    ];

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
            Format::Vpc => "vpc",
            Format::Luks => "luks",
        }
    }

    /// Parses qemu's name (`vhd` is accepted for `vpc`).
    pub fn from_name(name: &str) -> Result<Format> {
        Ok(match name {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            "vhdx" => Format::Vhdx,
            "vpc" | "vhd" => Format::Vpc,
            "luks" => Format::Luks,
            _ => {
                return Err(Error::invalid(format!("Unknown file format '{name}'")));
            }
        })
    }

    /// The driver, when its cargo feature is enabled.
    pub fn driver(self) -> Result<&'static dyn Driver> {
        let d: Option<&'static dyn Driver> = match self {
            #[cfg(feature = "raw")]
            Format::Raw => Some(&diskimg_raw::DRIVER),
            #[cfg(feature = "qcow2")]
            Format::Qcow2 => Some(&diskimg_qcow2::DRIVER),
            #[cfg(feature = "vmdk")]
            Format::Vmdk => Some(&diskimg_vmdk::DRIVER),
            #[cfg(feature = "vdi")]
            Format::Vdi => Some(&diskimg_vdi::DRIVER),
            #[cfg(feature = "vhdx")]
            Format::Vhdx => Some(&diskimg_vhdx::DRIVER),
            #[cfg(feature = "vhd")]
            Format::Vpc => Some(&diskimg_vhd::DRIVER),
            #[cfg(feature = "luks")]
            Format::Luks => Some(&diskimg_luks::DRIVER),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        d.ok_or_else(|| {
            Error::unsupported(self.name(), "support for this format was not compiled in")
        })
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Format::from_name(s)
    }
}

/// Guesses the format of `storage` from its contents. Raw is the fallback, never a
/// probe hit: a file no driver claims is raw. Never use the answer to decide how to
/// *write* a file someone else gave you without telling the user (qemu warns likewise).
pub fn probe(storage: &dyn Storage) -> Format {
    let mut best = (0u32, Format::Raw);
    for f in Format::ALL {
        if f == Format::Raw {
            continue;
        }
        if let Ok(d) = f.driver() {
            let score = d.probe(storage);
            if score > best.0 {
                best = (score, f);
            }
        }
    }
    best.1
}
