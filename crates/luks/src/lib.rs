//! LUKS1 for diskimg: the on-disk header and key slots ([`LuksHeader`]), the anti-forensic
//! splitter ([`af`]), PBKDF2 hashes ([`HashAlg`]), AES sector ciphers in XTS, CBC and ECB
//! modes with plain/plain64/ESSIV IVs ([`SectorCipher`]) — the pieces qcow2's
//! `encrypt.format=luks` is built from — and the standalone `luks` image format
//! ([`DRIVER`], [`LuksDevice`]): a LUKS1 header followed by the encrypted guest data, as
//! qemu's `luks` driver reads and writes it (the IV sector is the *guest* offset / 512;
//! inside qcow2 it is the host offset).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Secrets};
//!
//! let mut secrets = Secrets::new();
//! secrets.insert("sec0", b"passphrase".to_vec());
//! let storage = Arc::new(MemStorage::new());
//! let mut req = CreateRequest::new(1 << 20, OptionList::parse("key-secret=sec0,iter-time=10")?)
//!     .secrets(secrets.clone());
//! diskimg_luks::DRIVER.create(storage.clone(), &mut req)?;
//! let dev = diskimg_luks::DRIVER.open(
//!     storage.clone(),
//!     &OpenOptions::new().secrets(secrets).driver_option("key-secret", "sec0"),
//! )?;
//! dev.write_at(b"secret data", 4096)?;
//! let mut back = [0u8; 11];
//! dev.read_at(&mut back, 4096)?;
//! assert_eq!(&back, b"secret data");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod af;
pub mod cipher;
mod create;
mod device;
pub mod hash;
pub mod header;
mod xts;

use diskimg_blockio::{InfoValue, Result};

pub use cipher::{IvGen, Mode, SECTOR, SectorCipher};
pub use create::{LUKS_CREATE_KEYS, iterations_for, new_area};
pub use device::{DRIVER, KEY_SECRET, LuksDevice, LuksDriver};
pub use hash::HashAlg;
pub use header::{LuksHeader, LuksParams};

/// The legacy qcow2 AES cipher (`crypt_method` 1): AES-128-CBC with plain64 IVs keyed by the
/// passphrase (first 16 bytes, zero padded). Insecure; supported for compatibility.
pub fn legacy_aes(passphrase: &[u8]) -> Result<SectorCipher> {
    let mut key = [0u8; 16];
    key.iter_mut().zip(passphrase).for_each(|(k, p)| *k = *p);
    SectorCipher::new(Mode::Cbc, IvGen::Plain64, &key)
}

/// qemu's `info` data of a LUKS header (`QCryptoBlockInfoLUKS`, in qemu's key order):
/// `ivgen-alg`, `detached-header`, `hash-alg`, `cipher-alg`, `uuid`, `ivgen-hash-alg`
/// (ESSIV only), `cipher-mode`, `slots`, `payload-offset`, `master-key-iters`. qcow2 adds
/// `format: luks` before `cipher-mode`.
pub fn info_entries(h: &LuksHeader) -> Vec<(String, InfoValue)> {
    let s = |v: &str| InfoValue::Str(v.to_string());
    let int = |v: u64| InfoValue::Int(i64::try_from(v).unwrap_or(i64::MAX));
    let (mode, iv) = h
        .cipher_mode
        .split_once('-')
        .unwrap_or((&h.cipher_mode, ""));
    let (iv, iv_hash) = iv.split_once(':').unwrap_or((iv, ""));
    let bits = u64::from(h.key_bytes) * 8 / if mode == "xts" { 2 } else { 1 };
    let mut m = vec![
        ("ivgen-alg".to_string(), s(iv)),
        ("detached-header".into(), InfoValue::Bool(false)),
        ("hash-alg".into(), s(h.hash.name())),
        ("cipher-alg".into(), s(&format!("{}-{bits}", h.cipher_name))),
        ("uuid".into(), s(&h.uuid)),
    ];
    if !iv_hash.is_empty() {
        m.push(("ivgen-hash-alg".into(), s(iv_hash)));
    }
    m.push(("cipher-mode".into(), s(mode)));
    let sector = SECTOR as u64;
    let slots = h
        .slots
        .iter()
        .map(|k| {
            let mut v = vec![("active".to_string(), InfoValue::Bool(k.active))];
            if k.active {
                v.push(("iters".into(), int(u64::from(k.iterations))));
            }
            v.push((
                "key-offset".into(),
                int(u64::from(k.key_offset_sectors) * sector),
            ));
            if k.active {
                v.push(("stripes".into(), int(u64::from(k.stripes))));
            }
            InfoValue::Map(v)
        })
        .collect();
    m.push(("slots".into(), InfoValue::List(slots)));
    m.push((
        "payload-offset".into(),
        int(u64::from(h.payload_offset) * sector),
    ));
    m.push(("master-key-iters".into(), int(u64::from(h.mk_digest_iter))));
    m
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod qemu_tests;
