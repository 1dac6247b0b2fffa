//! Typed create options ([`VmdkCreateOptions`]) and the one adapter from qemu-img's `-o`
//! strings ([`VmdkCreateOptions::take`], [`VmdkCreateOptions::to_options`]).

use std::sync::Arc;

use diskimg_blockio::{CreateRequest, Error, OptionList, Preallocation, Result, Storage};

/// How the image's data is laid out in files (`subformat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with an embedded descriptor (the default).
    #[default]
    MonolithicSparse,
    /// A descriptor file and one flat (raw) extent.
    MonolithicFlat,
    /// A descriptor and sparse extents of at most 2 GiB each.
    TwoGbMaxExtentSparse,
    /// A descriptor and flat extents of at most 2 GiB each.
    TwoGbMaxExtentFlat,
    /// One sparse file of compressed grains (version 3), for distribution.
    StreamOptimized,
}

impl Subformat {
    const ALL: [Subformat; 5] = [
        Subformat::MonolithicSparse,
        Subformat::MonolithicFlat,
        Subformat::TwoGbMaxExtentSparse,
        Subformat::TwoGbMaxExtentFlat,
        Subformat::StreamOptimized,
    ];

    /// qemu's name (`monolithicSparse`, …).
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    /// Extents are flat (raw) files.
    pub fn is_flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }

    /// The data is split into extents of at most 2 GiB.
    pub fn is_split(self) -> bool {
        matches!(
            self,
            Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat
        )
    }
}

/// The virtual disk adapter the descriptor names (`adapter_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdapterType {
    /// `ide` (the default).
    #[default]
    Ide,
    /// `lsilogic`.
    LsiLogic,
    /// `buslogic`.
    BusLogic,
    /// `legacyESX`.
    LegacyEsx,
}

impl AdapterType {
    const ALL: [AdapterType; 4] = [
        AdapterType::Ide,
        AdapterType::LsiLogic,
        AdapterType::BusLogic,
        AdapterType::LegacyEsx,
    ];

    /// qemu's name (`ide`, `lsilogic`, `buslogic`, `legacyESX`).
    pub fn name(self) -> &'static str {
        match self {
            AdapterType::Ide => "ide",
            AdapterType::LsiLogic => "lsilogic",
            AdapterType::BusLogic => "buslogic",
            AdapterType::LegacyEsx => "legacyESX",
        }
    }
}

/// VMware tools version qemu writes when none is given.
const DEFAULT_TOOLS_VERSION: &str = "2147483647";

/// What `qemu-img create -f vmdk -o …` sets, typed.
///
/// ```
/// use std::sync::Arc;
/// use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage};
/// use diskimg_vmdk::{Subformat, VmdkCreateOptions};
///
/// let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// let opts = VmdkCreateOptions::new().subformat(Subformat::StreamOptimized);
/// opts.create(storage.clone(), &CreateRequest::new(1 << 20, OptionList::new()))?;
/// let dev = diskimg_vmdk::DRIVER.open(storage, &OpenOptions::new())?;
/// assert_eq!(dev.virtual_size(), 1 << 20);
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmdkCreateOptions {
    /// `subformat`.
    pub subformat: Subformat,
    /// `adapter_type`.
    pub adapter_type: AdapterType,
    /// `compat6`: hardware version 6 (refused together with `hwversion`).
    pub compat6: bool,
    /// `hwversion` (default 4; `undefined` in `-o` means unset).
    pub hwversion: Option<String>,
    /// `toolsversion` (default qemu's `2147483647`).
    pub toolsversion: String,
    /// `zeroed_grain`: zero grains as a grain-table flag (sparse subformats only).
    pub zeroed_grain: bool,
    /// `preallocation` of flat extents (`Off`, `Falloc`, `Full`).
    pub preallocation: Preallocation,
    /// `backing_file`: the parent VMDK of a delta image, named as it will be stored.
    pub backing_file: Option<String>,
}

impl Default for VmdkCreateOptions {
    fn default() -> Self {
        Self {
            subformat: Subformat::default(),
            adapter_type: AdapterType::default(),
            compat6: false,
            hwversion: None,
            toolsversion: DEFAULT_TOOLS_VERSION.to_string(),
            zeroed_grain: false,
            preallocation: Preallocation::Off,
            backing_file: None,
        }
    }
}

fn take_choice<T: Copy>(
    o: &mut OptionList,
    key: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<Option<T>> {
    match o.take(key) {
        None => Ok(None),
        Some(v) => all
            .iter()
            .copied()
            .find(|&t| name(t) == v)
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("invalid parameter value: {v}"))),
    }
}

impl VmdkCreateOptions {
    /// qemu's defaults: monolithicSparse, ide, hardware version 4.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`VmdkCreateOptions::subformat`].
    pub fn subformat(mut self, subformat: Subformat) -> Self {
        self.subformat = subformat;
        self
    }

    /// Sets [`VmdkCreateOptions::adapter_type`].
    pub fn adapter_type(mut self, adapter: AdapterType) -> Self {
        self.adapter_type = adapter;
        self
    }

    /// Sets [`VmdkCreateOptions::zeroed_grain`].
    pub fn zeroed_grain(mut self, on: bool) -> Self {
        self.zeroed_grain = on;
        self
    }

    /// Sets [`VmdkCreateOptions::preallocation`].
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// Sets [`VmdkCreateOptions::backing_file`] (a delta image).
    pub fn backing_file(mut self, name: impl Into<String>) -> Self {
        self.backing_file = Some(name.into());
        self
    }

    /// Takes the keys VMDK understands from `o` (qemu's names and messages); the rest is
    /// left for the caller to refuse.
    pub fn take(o: &mut OptionList) -> Result<Self> {
        let subformat =
            take_choice(o, "subformat", &Subformat::ALL, Subformat::name)?.unwrap_or_default();
        let adapter_type = take_choice(o, "adapter_type", &AdapterType::ALL, AdapterType::name)?
            .unwrap_or_default();
        let compat6 = o.take_bool("compat6")?.unwrap_or(false);
        // qemu prints an unset hwversion as "undefined" and accepts that value as unset.
        let hwversion = o.take("hwversion").filter(|h| h != "undefined");
        let toolsversion = o
            .take("toolsversion")
            .unwrap_or_else(|| DEFAULT_TOOLS_VERSION.to_string());
        let zeroed_grain = o.take_bool("zeroed_grain")?.unwrap_or(false);
        let preallocation = match o.take("preallocation") {
            None => Preallocation::Off,
            Some(p) => Preallocation::parse_file(&p)?,
        };
        // File-layer hints qemu accepts; meaningless for diskimg's storage.
        o.take_size("extent_size_hint")?;
        o.take_bool("nocow")?;
        let backing_file = o.take("backing_file").filter(|b| !b.is_empty());
        if let Some(f) = o.take("backing_fmt")
            && f != "vmdk"
        {
            return Err(Error::invalid("Backing format must be 'vmdk'"));
        }
        let opts = Self {
            subformat,
            adapter_type,
            compat6,
            hwversion,
            toolsversion,
            zeroed_grain,
            preallocation,
            backing_file,
        };
        opts.hardware_version()?;
        Ok(opts)
    }

    /// The `-o` list [`VmdkCreateOptions::take`] turns back into these options.
    pub fn to_options(&self) -> OptionList {
        let mut o = OptionList::new();
        o.set("subformat", self.subformat.name());
        o.set("adapter_type", self.adapter_type.name());
        if self.compat6 {
            o.set("compat6", "on");
        }
        if let Some(h) = &self.hwversion {
            o.set("hwversion", h);
        }
        o.set("toolsversion", &self.toolsversion);
        if self.zeroed_grain {
            o.set("zeroed_grain", "on");
        }
        if self.preallocation != Preallocation::Off {
            o.set("preallocation", self.preallocation.as_str());
        }
        if let Some(b) = &self.backing_file {
            o.set("backing_file", b);
            o.set("backing_fmt", "vmdk");
        }
        o
    }

    /// The hardware version the descriptor records, refusing what qemu refuses.
    pub(crate) fn hardware_version(&self) -> Result<String> {
        if self.zeroed_grain && self.subformat.is_flat() {
            return Err(Error::invalid("Flat image can't enable zeroed grain"));
        }
        if self.preallocation == Preallocation::Metadata {
            return Err(Error::invalid("Unsupported preallocation mode: metadata"));
        }
        match (self.compat6, &self.hwversion) {
            (true, Some(_)) => Err(Error::invalid(
                "compat6 cannot be enabled with hwversion set",
            )),
            (true, None) => Ok("6".to_string()),
            (false, Some(h)) => Ok(h.clone()),
            (false, None) => Ok("4".to_string()),
        }
    }

    /// Writes a new image of `request.size` bytes (rounded up to whole sectors) to the
    /// empty `storage`, the descriptor or single file; other extent files are created
    /// through `request.files`, named after `request.image_name`. `request.options` is
    /// not read.
    pub fn create(&self, storage: Arc<dyn Storage>, request: &CreateRequest) -> Result<()> {
        crate::create::create(storage, request, self)
    }
}
