//! The vhdx format (qemu name `vhdx`). Work in progress: not implemented yet.

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, CreateRequest, Driver, Error, OpenOptions, Result, Storage};

/// The vhdx driver for the `diskimg` facade's table.
pub static DRIVER: VhdxDriver = VhdxDriver;

/// Probe, open and create for vhdx.
#[derive(Debug)]
pub struct VhdxDriver;

impl Driver for VhdxDriver {
    fn name(&self) -> &'static str {
        "vhdx"
    }
    fn probe(&self, _storage: &dyn Storage) -> u32 {
        0
    }
    fn open(
        &self,
        _storage: Arc<dyn Storage>,
        _options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Err(Error::unsupported("vhdx", "not implemented yet"))
    }
    fn create(&self, _storage: Arc<dyn Storage>, _request: &mut CreateRequest) -> Result<()> {
        Err(Error::unsupported("vhdx", "not implemented yet"))
    }
}
