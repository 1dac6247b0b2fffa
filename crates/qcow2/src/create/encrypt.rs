//! Creating encrypted images: qemu's `encrypt.*` create options, the LUKS header area
//! (allocated right after the L1 table, pointed to by the 0x0537be77 extension, as
//! qemu lays it out) and legacy AES (`encrypt.format=aes`, `encryption=on`).

use diskimg_blockio::{Error, OptionList, Result, Secrets};
use zeroize::Zeroizing;

use crate::create::options::EncryptOptions;
use crate::crypto::new_area;
use crate::device::Qcow2Device;
use crate::disk::header::Header;
use crate::encryption::{CRYPT_AES, CRYPT_LUKS};

/// A new image's encryption, prepared before its header is written.
pub(crate) struct NewEncryption {
    /// The LUKS header area (phdr + key material), or `None` for legacy AES.
    area: Option<Zeroizing<Vec<u8>>>,
}

fn required() -> Error {
    Error::Key("Parameter 'encrypt.key-secret' is required for cipher".into())
}

impl NewEncryption {
    /// Looks up the passphrase in `secrets` and, for LUKS, builds the header area
    /// (checking the algorithms and timing the PBKDF2 iterations, as qemu does).
    pub(crate) fn new(e: &EncryptOptions, secrets: &Secrets) -> Result<Self> {
        let id = e.key_secret.as_deref().ok_or_else(required)?;
        let pass = secrets.require(id)?;
        if e.legacy_aes {
            if let Some(k) = e.unexpected_for_aes() {
                return Err(Error::invalid(format!("Parameter '{k}' is unexpected")));
            }
            return Ok(Self { area: None });
        }
        let mut o = OptionList::new();
        e.to_options(&mut o);
        let (_, area) = new_area(&mut o, "encrypt.", pass)?;
        Ok(Self { area: Some(area) })
    }

    /// Checks the other options and reserves the header extension in `h` (its offset is
    /// filled in by [`NewEncryption::install`]).
    pub(crate) fn prepare(&self, h: &mut Header) -> Result<()> {
        if let Some(a) = &self.area {
            h.ext.crypto = Some((0, a.len() as u64));
        }
        if h.cluster_size() <= 4096 {
            // As qemu: no feature-name table in small header clusters.
            h.ext.features.clear();
        }
        Ok(())
    }

    /// Allocates and writes the LUKS header area of the new image behind `dev`, then
    /// sets `crypt_method` and the extension in the image header.
    pub(crate) fn install(&self, dev: &Qcow2Device) -> Result<()> {
        let mut m = dev.lock();
        m.commit_deferred()?;
        let cs = m.cs();
        if let Some(area) = &self.area {
            let len = area.len() as u64;
            let n = len.div_ceil(cs);
            let off = m.alloc_run(n)?;
            m.commit_deferred()?;
            dev.file.write_all_at(area, off)?;
            if dev.file.len()? < off + n * cs {
                dev.file.set_len(off + n * cs)?;
            }
            m.note_meta(crate::engine::overlap::MetaKind::Header, off, n * cs);
            m.write_crypt(CRYPT_LUKS, Some((off, len)))
        } else {
            m.write_crypt(CRYPT_AES, None)
        }
    }
}
