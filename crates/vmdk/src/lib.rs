//! The vmdk format (qemu name `vmdk`). Work in progress: not implemented yet.

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, CreateRequest, Driver, Error, OpenOptions, Result, Storage};

/// The vmdk driver for the `diskimg` facade's table.
pub static DRIVER: VmdkDriver = VmdkDriver;

/// Probe, open and create for vmdk.
#[derive(Debug)]
pub struct VmdkDriver;

impl Driver for VmdkDriver {
    fn name(&self) -> &'static str {
        "vmdk"
    }
    fn probe(&self, _storage: &dyn Storage) -> u32 {
        0
    }
    fn open(
        &self,
        _storage: Arc<dyn Storage>,
        _options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Err(Error::unsupported("vmdk", "not implemented yet"))
    }
    fn create(&self, _storage: Arc<dyn Storage>, _request: &mut CreateRequest) -> Result<()> {
        Err(Error::unsupported("vmdk", "not implemented yet"))
    }
}
