//! Typed create options ([`VhdCreateOptions`]) and the one adapter from qemu-img's `-o`
//! strings ([`VhdCreateOptions::take`], [`VhdCreateOptions::to_options`]).

use diskimg_blockio::{CreateRequest, Error, OptionList, Preallocation, Result, Storage};

use crate::footer::FORMAT;

/// What `qemu-img create -f vpc -o …` sets, typed.
///
/// ```
/// use std::sync::Arc;
/// use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage};
/// use diskimg_vhd::VhdCreateOptions;
///
/// let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// let opts = VhdCreateOptions::new().fixed(true).force_size(true);
/// opts.create(storage.as_ref(), &CreateRequest::new(3 << 20, OptionList::new()))?;
/// let dev = diskimg_vhd::DRIVER.open(storage, &OpenOptions::new())?;
/// assert_eq!(dev.virtual_size(), 3 << 20);
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VhdCreateOptions {
    /// `subformat=fixed` (the data, then the footer) instead of `dynamic` (the default).
    pub fixed: bool,
    /// `force_size`: keep the exact size instead of rounding it to the CHS geometry (and
    /// mark the image as qemu does, creator `qem2`).
    pub force_size: bool,
    /// `azure_align`: round the size up to whole MiB and force it (Azure's rule).
    pub azure_align: bool,
    /// `preallocation` of a fixed image's data (`Off`, `Falloc`, `Full`).
    pub preallocation: Preallocation,
    /// `backing_file`: the parent VHD of a differencing disk (not in qemu), named as
    /// it will be stored (relative to the image's directory, or absolute).
    pub backing_file: Option<String>,
}

impl VhdCreateOptions {
    /// qemu's defaults: a dynamic disk with CHS-rounded size.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`VhdCreateOptions::fixed`].
    pub fn fixed(mut self, on: bool) -> Self {
        self.fixed = on;
        self
    }

    /// Sets [`VhdCreateOptions::force_size`].
    pub fn force_size(mut self, on: bool) -> Self {
        self.force_size = on;
        self
    }

    /// Sets [`VhdCreateOptions::azure_align`].
    pub fn azure_align(mut self, on: bool) -> Self {
        self.azure_align = on;
        self
    }

    /// Sets [`VhdCreateOptions::preallocation`].
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// Sets [`VhdCreateOptions::backing_file`] (a differencing disk).
    pub fn backing_file(mut self, name: impl Into<String>) -> Self {
        self.backing_file = Some(name.into());
        self
    }

    /// Takes the keys VHD understands from `o` (qemu's names and messages); the rest is
    /// left for the caller to refuse.
    pub fn take(o: &mut OptionList) -> Result<Self> {
        let fixed = matches!(
            o.take_enum("subformat", &["dynamic", "fixed"])?.as_deref(),
            Some("fixed")
        );
        let force_size = o.take_bool("force_size")?.unwrap_or(false);
        let azure_align = o.take_bool("azure_align")?.unwrap_or(false);
        let preallocation = match o.take("preallocation") {
            None => Preallocation::Off,
            Some(s) => Preallocation::parse_file(&s)?,
        };
        let backing_file = o.take("backing_file").filter(|b| !b.is_empty());
        match o.take("backing_fmt").as_deref() {
            None | Some("vpc" | "vhd") => {}
            Some(f) => {
                return Err(Error::unsupported(
                    FORMAT,
                    format!("backing format '{f}' (a differencing VHD's parent must be a VHD)"),
                ));
            }
        }
        let opts = Self {
            fixed,
            force_size,
            azure_align,
            preallocation,
            backing_file,
        };
        opts.validate()?;
        Ok(opts)
    }

    /// The `-o` list [`VhdCreateOptions::take`] turns back into these options.
    pub fn to_options(&self) -> OptionList {
        let mut o = OptionList::new();
        if self.fixed {
            o.set("subformat", "fixed");
        }
        if self.force_size {
            o.set("force_size", "on");
        }
        if self.azure_align {
            o.set("azure_align", "on");
        }
        if self.preallocation != Preallocation::Off {
            o.set("preallocation", self.preallocation.as_str());
        }
        if let Some(b) = &self.backing_file {
            o.set("backing_file", b);
            o.set("backing_fmt", FORMAT);
        }
        o
    }

    fn validate(&self) -> Result<()> {
        if self.backing_file.is_some() && self.fixed {
            return Err(Error::invalid(
                "a differencing VHD cannot be fixed (subformat=fixed with backing_file)",
            ));
        }
        if self.preallocation == Preallocation::Metadata {
            return Err(Error::invalid("Unsupported preallocation mode: metadata"));
        }
        Ok(())
    }

    /// Writes a new image of `request.size` bytes to the empty `storage` (a differencing
    /// disk reads its parent through `request.files`); `request.options` is not read.
    pub fn create(&self, storage: &dyn Storage, request: &CreateRequest) -> Result<()> {
        self.validate()?;
        crate::create::create(storage, request, self)
    }
}
