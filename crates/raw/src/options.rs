//! Typed create options ([`RawCreateOptions`]) and the one adapter from qemu-img's `-o`
//! strings ([`RawCreateOptions::take`], [`RawCreateOptions::to_options`]).

use diskimg_blockio::{CreateRequest, Error, OptionList, Preallocation, Result, Storage};

/// What `qemu-img create -f raw -o …` sets, typed.
///
/// ```
/// use diskimg_blockio::{CreateRequest, MemStorage, OptionList, Preallocation, Storage};
/// use diskimg_raw::RawCreateOptions;
///
/// let storage = MemStorage::new();
/// let opts = RawCreateOptions::new().preallocation(Preallocation::Full);
/// opts.create(&storage, &CreateRequest::new(1000, OptionList::new()))?;
/// assert_eq!(storage.len()?, 1000);
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RawCreateOptions {
    /// `preallocation`: `Off` (sparse), `Falloc` or `Full`; `Metadata` is refused, as
    /// by qemu's `file` protocol.
    pub preallocation: Preallocation,
}

impl RawCreateOptions {
    /// qemu's defaults: a sparse file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`RawCreateOptions::preallocation`].
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// Takes the keys raw understands from `o` (qemu's names and messages); the rest is
    /// left for the caller to refuse.
    pub fn take(o: &mut OptionList) -> Result<Self> {
        let preallocation = match o.take("preallocation") {
            None => Preallocation::Off,
            Some(s) => Preallocation::parse_file(&s)?,
        };
        Ok(Self { preallocation })
    }

    /// The `-o` list [`RawCreateOptions::take`] turns back into these options.
    pub fn to_options(&self) -> OptionList {
        let mut o = OptionList::new();
        if self.preallocation != Preallocation::Off {
            o.set("preallocation", self.preallocation.as_str());
        }
        o
    }

    /// Makes `storage` a raw image of exactly `request.size` bytes (the facade rounds
    /// sizes to whole sectors first); `request.options` is not read.
    pub fn create(&self, storage: &dyn Storage, request: &CreateRequest) -> Result<()> {
        if self.preallocation == Preallocation::Metadata {
            return Err(Error::invalid("Unsupported preallocation mode: metadata"));
        }
        storage.set_len(0)?;
        storage.preallocate(0, request.size, self.preallocation)?;
        storage.set_len(request.size)?;
        if self.preallocation != Preallocation::Full && request.size > 0 {
            // As qemu's file driver: the first block of a new file is written (zeroes,
            // 4 KiB or one sector for tiny images) so that later alignment probing and
            // `map` see it allocated.
            let n = if request.size < 4096 { 512 } else { 4096 };
            storage.write_all_at(&vec![0u8; n], 0)?;
        }
        storage.flush()
    }
}
