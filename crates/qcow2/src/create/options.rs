//! Typed create options ([`Qcow2CreateOptions`], [`EncryptOptions`]) and the one adapter
//! from qemu-img's `-o` strings, [`Keys::take`], shared by create
//! ([`Qcow2CreateOptions::take`]), measure ([`crate::MeasureTarget::from_options`]) and
//! amend ([`crate::Qcow2Device::amend`]).
//!
//! The adapter only parses values (qemu's "Parameter 'x' does not accept value 'y'");
//! the layout rules create and measure share (cluster size, refcount width, extended L2)
//! are [`Qcow2CreateOptions::check_layout`], the ones only `create` applies
//! [`Qcow2CreateOptions::check_create`], both with qemu's messages. Amend checks its
//! keys against the open image (`amend.rs`).

use diskimg_blockio::{Error, OptionList, Preallocation, Result};

pub use crate::create::encrypt::EncryptOptions;

/// qcow2 version (`compat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compat {
    /// Version 2 (`0.10`, `v2`): no feature bits, 16-bit refcounts only.
    V2,
    /// Version 3 (`1.1`, `v3`), the default.
    #[default]
    V3,
}

impl Compat {
    /// Parses qemu's names (`0.10`/`v2`, `1.1`/`v3`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "1.1" | "v3" => Some(Compat::V3),
            "0.10" | "v2" => Some(Compat::V2),
            _ => None,
        }
    }

    /// qemu's name (`0.10` or `1.1`).
    pub fn name(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }

    /// The header's version number.
    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// How compressed clusters are compressed (`compression_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompressionType {
    /// Deflate (the default).
    #[default]
    Zlib,
    /// Zstandard (version 3 only).
    Zstd,
}

/// Which verb reads the keys: qemu words a bad `compat` differently for amend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verb {
    /// `create` and `measure`: "Parameter 'version' does not accept value …".
    Create,
    /// `amend`: "Unknown compatibility level …".
    Amend,
}

/// The qcow2 `-o` keys (all but `size` and encryption), parsed with qemu's value
/// messages but neither defaulted nor checked against each other: the one adapter from
/// qemu-img's option strings that create, measure and amend share. `None` is a key not
/// given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Keys {
    /// `compat`.
    pub(crate) compat: Option<Compat>,
    /// `cluster_size`.
    pub(crate) cluster_size: Option<u64>,
    /// `refcount_bits`.
    pub(crate) refcount_bits: Option<u64>,
    /// `lazy_refcounts`.
    pub(crate) lazy_refcounts: Option<bool>,
    /// `extended_l2`.
    pub(crate) extended_l2: Option<bool>,
    /// `compression_type`.
    pub(crate) compression_type: Option<CompressionType>,
    /// `preallocation`.
    pub(crate) preallocation: Option<Preallocation>,
    /// `backing_file`.
    pub(crate) backing_file: Option<String>,
    /// `backing_fmt`.
    pub(crate) backing_fmt: Option<String>,
    /// `data_file`.
    pub(crate) data_file: Option<String>,
    /// `data_file_raw`.
    pub(crate) data_file_raw: Option<bool>,
}

impl Keys {
    /// Takes the keys from `o` in qemu's order; the rest (`size`, `encrypt.*`, unknown
    /// keys) stays for the caller.
    pub(crate) fn take(o: &mut OptionList, verb: Verb) -> Result<Self> {
        let compat = match o.take("compat") {
            None => None,
            Some(v) => Some(Compat::parse(&v).ok_or_else(|| match verb {
                Verb::Create => bad_value("version", &v),
                Verb::Amend => Error::invalid(format!("Unknown compatibility level {v}")),
            })?),
        };
        let cluster_size = o.take_size("cluster_size")?;
        let refcount_bits = take_refcount_bits(o)?;
        let lazy_refcounts = o.take_bool("lazy_refcounts")?;
        let extended_l2 = o.take_bool("extended_l2")?;
        let compression_type = match o.take("compression_type").as_deref() {
            None => None,
            Some("zlib") => Some(CompressionType::Zlib),
            Some("zstd") => Some(CompressionType::Zstd),
            Some(v) => return Err(bad_value("compression-type", v)),
        };
        let preallocation = match o.take("preallocation") {
            None => None,
            Some(v) => Some(Preallocation::parse(&v).map_err(|_| bad_value("preallocation", &v))?),
        };
        Ok(Self {
            compat,
            cluster_size,
            refcount_bits,
            lazy_refcounts,
            extended_l2,
            compression_type,
            preallocation,
            backing_file: o.take("backing_file"),
            backing_fmt: o.take("backing_fmt"),
            data_file: o.take("data_file"),
            data_file_raw: o.take_bool("data_file_raw")?,
        })
    }
}

/// `refcount_bits`: qemu's number options take negative values modulo 2^64, so `-1` is
/// a bad width (refused by [`check_refcount_width`]), not a parse error.
fn take_refcount_bits(o: &mut OptionList) -> Result<Option<u64>> {
    match o.take("refcount_bits") {
        None => Ok(None),
        Some(v) if v.trim_start().starts_with('-') && v.trim().parse::<i64>().is_ok() => {
            Ok(Some(0))
        }
        Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            Error::invalid(format!(
                "Parameter 'refcount_bits' expects a number, got '{v}'"
            ))
        }),
    }
}

/// What `qemu-img create -f qcow2 -o …` sets, typed.
///
/// ```
/// use std::sync::Arc;
/// use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
///                       OptionList, Storage};
/// use diskimg_qcow2::{Compat, Qcow2CreateOptions};
///
/// let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// let opts = Qcow2CreateOptions::new()
///     .compat(Compat::V3)
///     .cluster_size(4096)
///     .lazy_refcounts(true);
/// // Sizes round up to whole sectors, as in qemu-img.
/// opts.create(storage.clone(), &CreateRequest::new(1000, OptionList::new()))?;
/// let dev = diskimg_qcow2::DRIVER.open(storage, &OpenOptions::new())?;
/// assert_eq!(dev.info().cluster_size, Some(4096));
/// assert_eq!(dev.virtual_size(), 1024);
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Qcow2CreateOptions {
    /// `compat`: the header's `version` (spec "Header", bytes 4-7; default version 3).
    pub compat: Compat,
    /// `cluster_size`: `1 << cluster_bits` (header bytes 20-23), a power of two from
    /// 512 bytes to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// `refcount_bits`: `1 << refcount_order` (header bytes 96-99), a power of two up to
    /// 64 (default 16; version 2: only 16).
    pub refcount_bits: u64,
    /// `lazy_refcounts`: compatible feature bit 0 (version 3).
    pub lazy_refcounts: bool,
    /// `extended_l2`: incompatible feature bit 4, subclusters (version 3, clusters of at
    /// least 16 KiB).
    pub extended_l2: bool,
    /// `compression_type`: header byte 104 and incompatible bit 3 for zstd (version 3).
    pub compression_type: CompressionType,
    /// `preallocation`: `Off`, `Metadata`, `Falloc` or `Full`.
    pub preallocation: Preallocation,
    /// `backing_file`: the name stored at `backing_file_offset`, as given.
    pub backing_file: Option<String>,
    /// `backing_fmt`: the backing format header extension (0xe2792aca; needs a backing
    /// file).
    pub backing_format: Option<String>,
    /// `data_file`: the external data file extension (0x44415441) and incompatible bit 2
    /// (version 3); the file is created through [`CreateRequest::files`](diskimg_blockio::CreateRequest::files).
    pub data_file: Option<String>,
    /// `data_file_raw`: autoclear bit 1, the data file stays a valid raw image (needs
    /// `data_file`).
    pub data_file_raw: bool,
    /// `encrypt.*` / `encryption`: `crypt_method` (header bytes 32-35) and, for LUKS, the
    /// full disk encryption header extension (0x0537be77).
    pub encryption: Option<EncryptOptions>,
}

impl Default for Qcow2CreateOptions {
    fn default() -> Self {
        Self {
            compat: Compat::V3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            encryption: None,
        }
    }
}

fn bad_value(param: &str, v: &str) -> Error {
    Error::invalid(format!("Parameter '{param}' does not accept value '{v}'"))
}

const NEEDS_V3: &str = "compatibility level 1.1 and above (use version=v3 or greater)";

impl Qcow2CreateOptions {
    /// qemu's defaults: version 3, 64 KiB clusters, 16-bit refcounts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`Qcow2CreateOptions::compat`].
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = compat;
        self
    }

    /// Sets [`Qcow2CreateOptions::cluster_size`].
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// Sets [`Qcow2CreateOptions::refcount_bits`].
    pub fn refcount_bits(mut self, bits: u64) -> Self {
        self.refcount_bits = bits;
        self
    }

    /// Sets [`Qcow2CreateOptions::lazy_refcounts`].
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = on;
        self
    }

    /// Sets [`Qcow2CreateOptions::extended_l2`].
    pub fn extended_l2(mut self, on: bool) -> Self {
        self.extended_l2 = on;
        self
    }

    /// Sets [`Qcow2CreateOptions::compression_type`].
    pub fn compression_type(mut self, t: CompressionType) -> Self {
        self.compression_type = t;
        self
    }

    /// Sets [`Qcow2CreateOptions::preallocation`].
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// Sets the backing file and its format.
    pub fn backing(mut self, file: impl Into<String>, format: impl Into<String>) -> Self {
        self.backing_file = Some(file.into());
        self.backing_format = Some(format.into());
        self
    }

    /// Sets [`Qcow2CreateOptions::data_file`] and [`Qcow2CreateOptions::data_file_raw`].
    pub fn data_file(mut self, name: impl Into<String>, raw: bool) -> Self {
        self.data_file = Some(name.into());
        self.data_file_raw = raw;
        self
    }

    /// Sets [`Qcow2CreateOptions::encryption`].
    pub fn encryption(mut self, e: EncryptOptions) -> Self {
        self.encryption = Some(e);
        self
    }

    /// Takes the keys qcow2 understands from `o`, parsing values with qemu's messages
    /// (`size` is the caller's); the rest is left for the caller to refuse. The rules
    /// between options are checked when the image is created.
    pub fn take(o: &mut OptionList) -> Result<Self> {
        let keys = Keys::take(o, Verb::Create)?;
        let encryption = EncryptOptions::take(o)?;
        Ok(Self::from_keys(keys, encryption))
    }

    /// `keys` with qemu's defaults for the ones not given.
    pub(crate) fn from_keys(k: Keys, encryption: Option<EncryptOptions>) -> Self {
        let d = Self::default();
        Self {
            compat: k.compat.unwrap_or(d.compat),
            cluster_size: k.cluster_size.unwrap_or(d.cluster_size),
            refcount_bits: k.refcount_bits.unwrap_or(d.refcount_bits),
            lazy_refcounts: k.lazy_refcounts.unwrap_or(d.lazy_refcounts),
            extended_l2: k.extended_l2.unwrap_or(d.extended_l2),
            compression_type: k.compression_type.unwrap_or(d.compression_type),
            preallocation: k.preallocation.unwrap_or(d.preallocation),
            backing_file: k.backing_file,
            backing_format: k.backing_fmt,
            data_file: k.data_file,
            data_file_raw: k.data_file_raw.unwrap_or(d.data_file_raw),
            encryption,
        }
    }

    /// The `-o` list [`Qcow2CreateOptions::take`] turns back into these options.
    pub fn to_options(&self) -> OptionList {
        let mut o = OptionList::new();
        o.set("compat", self.compat.name());
        o.set("cluster_size", &self.cluster_size.to_string());
        o.set("refcount_bits", &self.refcount_bits.to_string());
        let on = |b: bool| if b { "on" } else { "off" };
        o.set("lazy_refcounts", on(self.lazy_refcounts));
        o.set("extended_l2", on(self.extended_l2));
        if self.compression_type == CompressionType::Zstd {
            o.set("compression_type", "zstd");
        }
        if self.preallocation != Preallocation::Off {
            o.set("preallocation", self.preallocation.as_str());
        }
        let names = [
            ("backing_file", &self.backing_file),
            ("backing_fmt", &self.backing_format),
            ("data_file", &self.data_file),
        ];
        for (k, v) in names {
            if let Some(v) = v {
                o.set(k, v);
            }
        }
        if self.data_file_raw {
            o.set("data_file_raw", "on");
        }
        if let Some(e) = &self.encryption {
            e.to_options(&mut o);
        }
        o
    }

    /// The layout rules create and measure share: cluster size, refcount width (16 bits
    /// on version 2), extended L2 clusters of at least 16 KiB.
    pub fn check_layout(&self) -> Result<()> {
        self.check_cluster_and_width()?;
        self.check_extended_l2()
    }

    /// Everything `create` checks, in qemu's order: the cluster size and refcount width,
    /// version 3 features on version 2, extended L2, and the combinations qemu refuses
    /// (data file, backing file, preallocation).
    pub fn check_create(&self) -> Result<()> {
        self.check_cluster_and_width()?;
        if self.compat == Compat::V2 {
            let v3_only = [
                (self.lazy_refcounts, "Lazy refcounts only supported"),
                (self.extended_l2, "Extended L2 entries are only supported"),
                (
                    self.compression_type == CompressionType::Zstd,
                    "Non-zlib compression type is only supported",
                ),
                (
                    self.data_file.is_some(),
                    "External data files are only supported",
                ),
            ];
            if let Some((_, what)) = v3_only.iter().find(|(on, _)| *on) {
                return Err(Error::invalid(format!("{what} with {NEEDS_V3}")));
            }
        }
        self.check_extended_l2()?;
        let backing = self.backing_file.is_some();
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::invalid("data-file-raw requires data-file"));
        }
        if self.data_file_raw && backing {
            return Err(Error::invalid(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        if backing && self.preallocation != Preallocation::Off && !self.extended_l2 {
            return Err(Error::invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if self.backing_format.is_some() && !backing {
            return Err(Error::invalid(
                "Backing format cannot be used without backing file",
            ));
        }
        Ok(())
    }

    /// The cluster size, the refcount width and (version 2) its 16 bits.
    fn check_cluster_and_width(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        check_refcount_width(self.refcount_bits)?;
        if self.compat == Compat::V2 && self.refcount_bits != 16 {
            return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or \
                 above (use version=v3 or greater)",
            ));
        }
        Ok(())
    }

    fn check_extended_l2(&self) -> Result<()> {
        if self.extended_l2 && self.cluster_size < 16384 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        Ok(())
    }
}

/// A refcount width qemu accepts: a power of two up to 64 bits.
pub(crate) fn check_refcount_width(bits: u64) -> Result<()> {
    if !bits.is_power_of_two() || bits > 64 {
        return Err(Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_options_round_trips_through_take() {
        let opts = Qcow2CreateOptions::new()
            .compat(Compat::V2)
            .cluster_size(4096)
            .lazy_refcounts(true)
            .compression_type(CompressionType::Zstd)
            .preallocation(Preallocation::Metadata)
            .backing("base.qcow2", "qcow2")
            .data_file("data.raw", true)
            .encryption(EncryptOptions::luks("sec0"));
        let mut o = opts.to_options();
        assert_eq!(Qcow2CreateOptions::take(&mut o).unwrap(), opts);
        assert!(o.is_empty());
    }

    #[test]
    fn amend_words_a_bad_compat_its_own_way() {
        let mut o = OptionList::parse("compat=2").unwrap();
        let e = Keys::take(&mut o.clone(), Verb::Create).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'version' does not accept value '2'"
        );
        let e = Keys::take(&mut o, Verb::Amend).unwrap_err();
        assert_eq!(e.to_string(), "Unknown compatibility level 2");
    }
}
