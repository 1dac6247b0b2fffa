//! Typed create options ([`VhdxCreateOptions`]) and the one adapter from qemu-img's `-o`
//! strings ([`VhdxCreateOptions::take`], [`VhdxCreateOptions::to_options`]).

use diskimg_blockio::{CreateRequest, Error, OptionList, Result, Storage};

use crate::format::MIB;

/// What `qemu-img create -f vhdx -o …` sets, typed.
///
/// ```
/// use std::sync::Arc;
/// use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage};
/// use diskimg_vhdx::VhdxCreateOptions;
///
/// let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// let opts = VhdxCreateOptions::new().block_size(Some(1 << 20));
/// opts.create(storage.as_ref(), &CreateRequest::new(8 << 20, OptionList::new()))?;
/// let dev = diskimg_vhdx::DRIVER.open(storage, &OpenOptions::new())?;
/// assert_eq!(dev.info().cluster_size, Some(1 << 20));
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VhdxCreateOptions {
    /// `log_size` in bytes, rounded up to whole MiB (default 1 MiB, at most 4 GiB).
    pub log_size: u64,
    /// `block_size` in bytes, rounded up to whole MiB, at most 256 MiB, a power of two;
    /// `None` (or `0` in `-o`) scales it with the disk size as qemu does.
    pub block_size: Option<u64>,
    /// `subformat=fixed` (every block allocated) instead of `dynamic` (the default).
    pub fixed: bool,
    /// `block_state_zero` (default on): new blocks of a dynamic image are marked
    /// `PAYLOAD_BLOCK_ZERO`, as qemu does.
    pub block_state_zero: bool,
    /// `backing_file`: the parent VHDX of a differencing image (which qemu cannot
    /// create), named as it will be stored.
    pub backing_file: Option<String>,
}

impl Default for VhdxCreateOptions {
    fn default() -> Self {
        Self {
            log_size: MIB,
            block_size: None,
            fixed: false,
            block_state_zero: true,
            backing_file: None,
        }
    }
}

impl VhdxCreateOptions {
    /// qemu's defaults: a dynamic image, 1 MiB log, automatic block size.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`VhdxCreateOptions::log_size`].
    pub fn log_size(mut self, bytes: u64) -> Self {
        self.log_size = bytes;
        self
    }

    /// Sets [`VhdxCreateOptions::block_size`].
    pub fn block_size(mut self, bytes: Option<u64>) -> Self {
        self.block_size = bytes;
        self
    }

    /// Sets [`VhdxCreateOptions::fixed`].
    pub fn fixed(mut self, on: bool) -> Self {
        self.fixed = on;
        self
    }

    /// Sets [`VhdxCreateOptions::block_state_zero`].
    pub fn block_state_zero(mut self, on: bool) -> Self {
        self.block_state_zero = on;
        self
    }

    /// Sets [`VhdxCreateOptions::backing_file`] (a differencing image).
    pub fn backing_file(mut self, name: impl Into<String>) -> Self {
        self.backing_file = Some(name.into());
        self
    }

    /// Takes the keys VHDX understands from `o` (qemu's names and messages); the rest is
    /// left for the caller to refuse.
    pub fn take(o: &mut OptionList) -> Result<Self> {
        let log_size = o.take_size("log_size")?.unwrap_or(MIB);
        check_log_size(log_size)?;
        let block_size = o.take_size("block_size")?.filter(|&b| b != 0);
        if let Some(b) = block_size {
            check_block_size(b)?;
        }
        let fixed = match o.take("subformat").as_deref() {
            None | Some("dynamic") => false,
            Some("fixed") => true,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "Parameter 'subformat' does not accept value '{v}'"
                )));
            }
        };
        let block_state_zero = o.take_bool("block_state_zero")?.unwrap_or(true);
        let backing_file = o.take("backing_file").filter(|s| !s.is_empty());
        if let Some(f) = o.take("backing_fmt")
            && f != "vhdx"
        {
            return Err(Error::invalid(
                "A differencing VHDX image needs a vhdx backing file",
            ));
        }
        let opts = Self {
            log_size,
            block_size,
            fixed,
            block_state_zero,
            backing_file,
        };
        opts.check_parent()?;
        Ok(opts)
    }

    /// The `-o` list [`VhdxCreateOptions::take`] turns back into these options.
    pub fn to_options(&self) -> OptionList {
        let mut o = OptionList::new();
        if self.log_size != MIB {
            o.set("log_size", &self.log_size.to_string());
        }
        if let Some(b) = self.block_size {
            o.set("block_size", &b.to_string());
        }
        if self.fixed {
            o.set("subformat", "fixed");
        }
        if !self.block_state_zero {
            o.set("block_state_zero", "off");
        }
        if let Some(b) = &self.backing_file {
            o.set("backing_file", b);
            o.set("backing_fmt", "vhdx");
        }
        o
    }

    fn check_parent(&self) -> Result<()> {
        if self.backing_file.is_some() && self.fixed {
            return Err(Error::invalid("A differencing VHDX image cannot be fixed"));
        }
        Ok(())
    }

    /// Writes a new image of `request.size` bytes (rounded up to whole sectors) to the
    /// empty `storage` (a differencing image reads its parent's `DataWriteGuid` through
    /// `request.files` when it may); `request.options` is not read.
    pub fn create(&self, storage: &dyn Storage, request: &CreateRequest) -> Result<()> {
        check_log_size(self.log_size)?;
        if let Some(b) = self.block_size {
            check_block_size(b)?;
        }
        self.check_parent()?;
        crate::create::create(storage, request, self)
    }
}

/// The log size as written: whole MiB, non-zero, below 4 GiB.
pub(crate) fn log_bytes(log_size: u64) -> Result<u64> {
    match log_size.checked_next_multiple_of(MIB) {
        Some(l) if l != 0 && l <= u64::from(u32::MAX) => Ok(l),
        _ => Err(Error::invalid("Log size must be a multiple of 1 MB")),
    }
}

/// An explicit block size as written: whole MiB, at most 256 MiB, a power of two.
pub(crate) fn block_bytes(block_size: u64) -> Result<u64> {
    let b = block_size
        .checked_next_multiple_of(MIB)
        .unwrap_or(u64::MAX)
        .min(256 * MIB);
    if !b.is_power_of_two() {
        return Err(Error::invalid("Block size must be a power of two"));
    }
    Ok(b)
}

fn check_log_size(log_size: u64) -> Result<()> {
    log_bytes(log_size).map(drop)
}

fn check_block_size(block_size: u64) -> Result<()> {
    block_bytes(block_size).map(drop)
}
