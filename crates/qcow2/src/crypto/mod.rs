//! qcow2 encryption building blocks: AES sector ciphers, PBKDF2 hashes, the LUKS1
//! anti-forensic splitter and LUKS1 headers, and legacy qcow2 AES.
//!
//! qemu encrypts qcow2 data per 512-byte sector. With `encrypt.format=luks` the IV sector
//! number is the *host* offset / 512 (`crypt_physical_offset`); with legacy
//! `encrypt.format=aes` (AES-128-CBC, plain64) it is the *guest* offset / 512 and the key is
//! the passphrase's first 16 bytes, zero padded.

pub mod af;
pub mod cipher;
pub mod hash;
pub mod luks;
mod xts;

use diskimg_blockio::Result;

pub use cipher::{IvGen, Mode, SectorCipher};
pub use hash::HashAlg;
pub use luks::{LuksHeader, LuksParams};

/// The legacy qcow2 AES cipher (`crypt_method` 1): AES-128-CBC with plain64 IVs keyed by the
/// passphrase (first 16 bytes, zero padded). Insecure; supported for compatibility.
pub fn legacy_aes(passphrase: &[u8]) -> Result<SectorCipher> {
    let mut key = [0u8; 16];
    key.iter_mut().zip(passphrase).for_each(|(k, p)| *k = *p);
    SectorCipher::new(Mode::Cbc, IvGen::Plain64, &key)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod qemu_tests;
