//! The vhd format (qemu name `vpc`). Work in progress: not implemented yet.

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, CreateRequest, Driver, Error, OpenOptions, Result, Storage};

/// The vhd driver for the `diskimg` facade's table.
pub static DRIVER: VhdDriver = VhdDriver;

/// Probe, open and create for vhd.
#[derive(Debug)]
pub struct VhdDriver;

impl Driver for VhdDriver {
    fn name(&self) -> &'static str {
        "vpc"
    }
    fn probe(&self, _storage: &dyn Storage) -> u32 {
        0
    }
    fn open(
        &self,
        _storage: Arc<dyn Storage>,
        _options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Err(Error::unsupported("vpc", "not implemented yet"))
    }
    fn create(&self, _storage: Arc<dyn Storage>, _request: &mut CreateRequest) -> Result<()> {
        Err(Error::unsupported("vpc", "not implemented yet"))
    }
}
