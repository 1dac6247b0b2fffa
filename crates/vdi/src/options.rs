//! Typed create options ([`VdiCreateOptions`]) and the one adapter from qemu-img's `-o`
//! strings ([`VdiCreateOptions::take`], [`VdiCreateOptions::to_options`]).

use std::sync::Arc;

use diskimg_blockio::{CreateRequest, Error, OptionList, Preallocation, Result, Storage};

/// What `qemu-img create -f vdi -o …` sets, typed.
///
/// ```
/// use std::sync::Arc;
/// use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage};
/// use diskimg_vdi::VdiCreateOptions;
///
/// let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// let opts = VdiCreateOptions::new().static_image(true);
/// opts.create(storage.clone(), &CreateRequest::new(4 << 20, OptionList::new()))?;
/// let dev = diskimg_vdi::DRIVER.open(storage, &OpenOptions::new())?;
/// assert_eq!(dev.virtual_size(), 4 << 20);
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VdiCreateOptions {
    /// `static=on`: every block is mapped at create time (qemu's "VDI static
    /// (pre-allocated) image"); the data area is sparse unless preallocated.
    pub static_image: bool,
    /// `preallocation`: `Off`, `Falloc` or `Full` (how the file is allocated);
    /// `Metadata` is refused, as by qemu.
    pub preallocation: Preallocation,
}

impl VdiCreateOptions {
    /// qemu's defaults: a dynamic image, no preallocation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`VdiCreateOptions::static_image`].
    pub fn static_image(mut self, on: bool) -> Self {
        self.static_image = on;
        self
    }

    /// Sets [`VdiCreateOptions::preallocation`].
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// Takes the keys VDI understands from `o` (qemu's names and messages); the rest is
    /// left for the caller to refuse.
    pub fn take(o: &mut OptionList) -> Result<Self> {
        let static_image = o.take_bool("static")?.unwrap_or(false);
        let preallocation = match o.take("preallocation") {
            None => Preallocation::Off,
            Some(v) => Preallocation::parse_file(&v)?,
        };
        // File-layer hints qemu accepts; meaningless for diskimg's storage.
        o.take_size("extent_size_hint")?;
        o.take_bool("nocow")?;
        Ok(Self {
            static_image,
            preallocation,
        })
    }

    /// The `-o` list [`VdiCreateOptions::take`] turns back into these options.
    pub fn to_options(&self) -> OptionList {
        let mut o = OptionList::new();
        if self.static_image {
            o.set("static", "on");
        }
        if self.preallocation != Preallocation::Off {
            o.set("preallocation", self.preallocation.as_str());
        }
        o
    }

    /// Writes a new image of `request.size` bytes (rounded up to whole sectors) to the
    /// empty `storage`; `request.options` is not read.
    pub fn create(&self, storage: Arc<dyn Storage>, request: &CreateRequest) -> Result<()> {
        if self.preallocation == Preallocation::Metadata {
            return Err(Error::invalid("Unsupported preallocation mode: metadata"));
        }
        crate::create::create(storage, request.size, self)
    }
}
