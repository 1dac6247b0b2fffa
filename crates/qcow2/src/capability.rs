//! The capabilities a qcow2 device offers through the [`BlockDevice`] accessors
//! (`as_snapshots`, `as_bitmaps`, `as_amend`, `as_chain_link`): thin adapters over
//! [`Qcow2Device`]'s own API, so that callers above the format crates need no downcast.

use std::sync::Arc;

use diskimg_blockio::{
    Amend, BitmapData, BitmapInfo, Bitmaps, BlockDevice, ChainLink, Error, OptionList, Result,
    Secrets, Snapshots,
};

use crate::device::Qcow2Device;

impl Snapshots for Qcow2Device {
    fn create(&self, name: &str) -> Result<String> {
        self.create_snapshot(name)
    }
    fn apply(&self, id_or_name: &str) -> Result<()> {
        self.apply_snapshot(id_or_name)
    }
    fn delete(&self, id_or_name: &str) -> Result<()> {
        self.delete_snapshot(id_or_name)
    }
    fn open(&self, id_or_name: &str) -> Result<Arc<dyn BlockDevice>> {
        self.open_snapshot(id_or_name)
    }
    fn load_vmstate(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        crate::features::vmstate::load(self, buf, pos)
    }
    fn save_vmstate(&self, buf: &[u8], pos: u64) -> Result<()> {
        crate::features::vmstate::save(self, buf, pos)
    }
}

impl Bitmaps for Qcow2Device {
    fn list(&self) -> Vec<BitmapInfo> {
        self.bitmaps()
    }
    fn read(&self, name: &str) -> Result<BitmapData> {
        crate::features::bitmap::read_current(self, name)
    }
}

/// The options qemu's qcow2 driver lists for amendment (besides `encrypt.*`).
const AMENDABLE: &[&str] = &[
    "compat",
    "lazy_refcounts",
    "refcount_bits",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "size",
];

/// `options` split into the `encrypt.*` key-slot options and the rest.
fn split_encrypt(options: &OptionList) -> (OptionList, OptionList) {
    let (mut enc, mut plain) = (OptionList::new(), OptionList::new());
    for (k, v) in options.entries() {
        if k.starts_with("encrypt.") {
            enc.set(k, v);
        } else {
            plain.set(k, v);
        }
    }
    (enc, plain)
}

impl Amend for Qcow2Device {
    /// Options outside qemu's amend list fail as [`Qcow2Device::amend`] refuses them.
    fn check_options(&self, options: &OptionList) -> Result<()> {
        let (_, plain) = split_encrypt(options);
        let mut unknown = OptionList::new();
        for (k, v) in plain.entries() {
            if !AMENDABLE.contains(&k.as_str()) {
                unknown.set(k, v);
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        Qcow2Device::amend(self, &unknown)
    }

    /// The format options ([`Qcow2Device::amend`]), then the key-slot options
    /// ([`Qcow2Device::amend_encryption`]).
    fn amend(&self, options: &OptionList, secrets: &Secrets) -> Result<()> {
        self.amend_forced(options, secrets, false)
    }

    /// As [`Amend::amend`]; `force` lets key-slot changes lose data (see
    /// [`Qcow2Device::amend_encryption_forced`]).
    fn amend_forced(&self, options: &OptionList, secrets: &Secrets, force: bool) -> Result<()> {
        Amend::amend_with_progress(self, options, secrets, force, &mut |_, _| {})
    }

    /// As [`Amend::amend_forced`], with qemu's progress reports
    /// ([`Qcow2Device::amend_with_progress`]).
    fn amend_with_progress(
        &self,
        options: &OptionList,
        secrets: &Secrets,
        force: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let (mut enc, plain) = split_encrypt(options);
        if !plain.is_empty() {
            let r = Qcow2Device::amend_with_progress(self, &plain, !enc.is_empty(), progress);
            // Amends rewrite tables wholesale (zero clusters expanded, refcounts
            // rebuilt): the frees moved the host epoch already; this covers the rest.
            self.epoch.bump();
            r?;
        }
        if !enc.is_empty() {
            self.amend_encryption_forced(&mut enc, secrets, force)?;
            if let Some((k, _)) = enc.entries().first() {
                return Err(Error::invalid(format!("Invalid parameter '{k}'")));
            }
        }
        Ok(())
    }
}

impl ChainLink for Qcow2Device {
    fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        Qcow2Device::set_backing_file(self, name, format)
    }
    fn make_empty(&self) -> Result<()> {
        Qcow2Device::make_empty(self)
    }
    /// qcow2 does not record its backing image's state: nothing to do.
    fn relink_parent(&self, _parent: &dyn BlockDevice) -> Result<()> {
        Ok(())
    }
}
