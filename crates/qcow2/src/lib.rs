//! The qcow2 format (qemu name `qcow2`). Work in progress: not implemented yet.

pub mod crypto;

use std::sync::Arc;

use diskimg_blockio::{BlockDevice, CreateRequest, Driver, Error, OpenOptions, Result, Storage};

/// The qcow2 driver for the `diskimg` facade's table.
pub static DRIVER: Qcow2Driver = Qcow2Driver;

/// Probe, open and create for qcow2.
#[derive(Debug)]
pub struct Qcow2Driver;

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn probe(&self, _storage: &dyn Storage) -> u32 {
        0
    }
    fn open(
        &self,
        _storage: Arc<dyn Storage>,
        _options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>> {
        Err(Error::unsupported("qcow2", "not implemented yet"))
    }
    fn create(&self, _storage: Arc<dyn Storage>, _request: &mut CreateRequest) -> Result<()> {
        Err(Error::unsupported("qcow2", "not implemented yet"))
    }
}
