//! Creating encrypted images: the typed `encrypt.*` create options ([`EncryptOptions`],
//! qemu's names and defaults), the LUKS header area (allocated right after the L1 table,
//! pointed to by the 0x0537be77 extension, as qemu lays it out) and legacy AES
//! (`encrypt.format=aes`, `encryption=on`).

use diskimg_blockio::{Error, OptionList, Result, Secrets};
use zeroize::Zeroizing;

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

/// Encryption of a new image (`encrypt.*` and the deprecated `encryption`). Algorithm
/// names are qemu's; they are checked when the image is created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EncryptOptions {
    /// `encrypt.format=aes` (legacy qcow2 AES, insecure) instead of `luks`.
    pub legacy_aes: bool,
    /// `encrypt.key-secret`: the id of the secret holding the passphrase
    /// ([`CreateRequest::secrets`](diskimg_blockio::CreateRequest::secrets)); required.
    pub key_secret: Option<String>,
    /// `encrypt.cipher-alg` (LUKS; default `aes-256`).
    pub cipher_alg: Option<String>,
    /// `encrypt.cipher-mode` (LUKS; default `xts`).
    pub cipher_mode: Option<String>,
    /// `encrypt.ivgen-alg` (LUKS; default `plain64`).
    pub ivgen_alg: Option<String>,
    /// `encrypt.ivgen-hash-alg` (LUKS, with `essiv`; default `sha256`).
    pub ivgen_hash_alg: Option<String>,
    /// `encrypt.hash-alg` (LUKS; default `sha256`).
    pub hash_alg: Option<String>,
    /// `encrypt.iter-time` in milliseconds (LUKS; default 2000).
    pub iter_time: Option<u64>,
}

/// The `encrypt.*` keys only LUKS takes (qemu: "Parameter '…' is unexpected" for aes).
const LUKS_ONLY: &[&str] = &[
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

impl EncryptOptions {
    /// LUKS with qemu's defaults and the passphrase in secret `key_secret`.
    pub fn luks(key_secret: impl Into<String>) -> Self {
        Self {
            key_secret: Some(key_secret.into()),
            ..Self::default()
        }
    }

    /// Takes `encryption` and the `encrypt.*` keys from `o`; `None` when no encryption
    /// format is given (a lone `encrypt.key-secret` is dropped, as qemu ignores it).
    pub fn take(o: &mut OptionList) -> Result<Option<Self>> {
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
            o.take("encrypt.key-secret");
            return Ok(None);
        };
        Ok(Some(Self {
            legacy_aes: format == "aes",
            key_secret: o.take("encrypt.key-secret"),
            cipher_alg: o.take("encrypt.cipher-alg"),
            cipher_mode: o.take("encrypt.cipher-mode"),
            ivgen_alg: o.take("encrypt.ivgen-alg"),
            ivgen_hash_alg: o.take("encrypt.ivgen-hash-alg"),
            hash_alg: o.take("encrypt.hash-alg"),
            iter_time: o.take_u64("encrypt.iter-time")?,
        }))
    }

    /// The `-o` keys [`EncryptOptions::take`] turns back into these options.
    pub fn to_options(&self, o: &mut OptionList) {
        o.set(
            "encrypt.format",
            if self.legacy_aes { "aes" } else { "luks" },
        );
        let keys = [
            ("encrypt.key-secret", &self.key_secret),
            ("encrypt.cipher-alg", &self.cipher_alg),
            ("encrypt.cipher-mode", &self.cipher_mode),
            ("encrypt.ivgen-alg", &self.ivgen_alg),
            ("encrypt.ivgen-hash-alg", &self.ivgen_hash_alg),
            ("encrypt.hash-alg", &self.hash_alg),
        ];
        for (k, v) in keys {
            if let Some(v) = v {
                o.set(k, v);
            }
        }
        if let Some(t) = self.iter_time {
            o.set("encrypt.iter-time", &t.to_string());
        }
    }

    /// The LUKS-only keys set on a legacy AES request (qemu refuses them).
    pub(crate) fn unexpected_for_aes(&self) -> Option<&'static str> {
        let set = [
            self.cipher_alg.is_some(),
            self.cipher_mode.is_some(),
            self.ivgen_alg.is_some(),
            self.ivgen_hash_alg.is_some(),
            self.hash_alg.is_some(),
            self.iter_time.is_some(),
        ];
        LUKS_ONLY
            .iter()
            .zip(set)
            .find(|(_, on)| *on)
            .map(|(k, _)| *k)
    }
}
