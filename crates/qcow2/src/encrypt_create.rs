//! Creating encrypted images: qemu's `encrypt.*` create options, the LUKS header area
//! (allocated right after the L1 table, pointed to by the 0x0537be77 extension, as
//! qemu lays it out) and legacy AES (`encrypt.format=aes`, `encryption=on`).

use diskimg_blockio::{Error, OptionList, Preallocation, Result, Secrets};
use zeroize::Zeroizing;

use crate::crypto::{LUKS_CREATE_KEYS, new_area};
use crate::device::Qcow2Device;
use crate::encryption::{CRYPT_AES, CRYPT_LUKS};
use crate::header::Header;

/// A new image's encryption, prepared before its header is written.
pub(crate) struct NewEncryption {
    /// The LUKS header area (phdr + key material), or `None` for legacy AES.
    area: Option<Zeroizing<Vec<u8>>>,
}

fn required() -> Error {
    Error::Key("Parameter 'encrypt.key-secret' is required for cipher".into())
}

/// Takes the encryption options from `o` (none given: `Ok(None)`).
pub(crate) fn take_options(o: &mut OptionList, secrets: &Secrets) -> Result<Option<NewEncryption>> {
    let legacy = o.take_bool("encryption")?;
    let format = o.get("encrypt.format").map(str::to_string);
    if legacy.is_some() && format.is_some() {
        return Err(Error::invalid(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time",
        ));
    }
    let format = match (format, legacy) {
        (Some(_), _) => o.take_enum("encrypt.format", &["luks", "aes"])?,
        (None, Some(true)) => Some("aes".to_string()),
        (None, _) => None,
    };
    let Some(format) = format else {
        // qemu ignores a key secret without an encryption format.
        o.take("encrypt.key-secret");
        return Ok(None);
    };
    let id = o.take("encrypt.key-secret").ok_or_else(required)?;
    let pass = secrets.require(&id)?;
    if format == "aes" {
        // Options only LUKS accepts (qemu: "Parameter '…' is unexpected" for aes).
        if let Some(k) = LUKS_CREATE_KEYS
            .iter()
            .map(|k| format!("encrypt.{k}"))
            .find(|k| o.get(k).is_some())
        {
            return Err(Error::invalid(format!("Parameter '{k}' is unexpected")));
        }
        return Ok(Some(NewEncryption { area: None }));
    }
    let (_, area) = new_area(o, "encrypt.", pass)?;
    Ok(Some(NewEncryption { area: Some(area) }))
}

impl NewEncryption {
    /// Checks the other options and reserves the header extension in `h` (its offset is
    /// filled in by [`NewEncryption::install`]).
    pub(crate) fn prepare(&self, h: &mut Header, prealloc: Preallocation) -> Result<()> {
        if prealloc != Preallocation::Off {
            // qemu allows it, but preallocated clusters then read as decrypted garbage.
            return Err(Error::unsupported(
                "qcow2",
                "preallocation of encrypted images",
            ));
        }
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
            m.note_meta(off, n * cs);
            m.h.ext.crypto = Some((off, len));
            m.h.crypt_method = CRYPT_LUKS;
        } else {
            m.h.crypt_method = CRYPT_AES;
        }
        dev.file.flush()?;
        let ext = m.h.ext.serialise(m.h.version);
        dev.file.write_all_at(&ext, u64::from(m.h.header_length))?;
        dev.file.write_all_at(&m.h.crypt_method.to_be_bytes(), 32)?;
        dev.file.flush()
    }
}
