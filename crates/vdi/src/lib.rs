//! The vdi format (qemu name `vdi`). Work in progress: not implemented yet.

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, CreateRequest, Driver, Error, OpenOptions, Result, Storage};

/// The vdi driver for the `diskimg` facade's table.
pub static DRIVER: VdiDriver = VdiDriver;

/// Probe, open and create for vdi.
#[derive(Debug)]
pub struct VdiDriver;

impl Driver for VdiDriver {
    fn name(&self) -> &'static str {
        "vdi"
    }
    fn probe(&self, _storage: &dyn Storage) -> u32 {
        0
    }
    fn open(
        &self,
        _storage: Arc<dyn Storage>,
        _options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Err(Error::unsupported("vdi", "not implemented yet"))
    }
    fn create(&self, _storage: Arc<dyn Storage>, _request: &mut CreateRequest) -> Result<()> {
        Err(Error::unsupported("vdi", "not implemented yet"))
    }
}
