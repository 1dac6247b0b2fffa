//! Creating encrypted images: qemu's `encrypt.*` create options, the LUKS header area
//! (allocated right after the L1 table, pointed to by the 0x0537be77 extension, as
//! qemu lays it out) and legacy AES (`encrypt.format=aes`, `encryption=on`).

use std::time::{Duration, Instant};

use diskimg_blockio::{Error, OptionList, Preallocation, Result, Secrets};
use zeroize::Zeroizing;

use crate::crypto::hash::random_bytes;
use crate::crypto::luks::MAX_ITERATIONS;
use crate::crypto::{HashAlg, LuksHeader, LuksParams, SectorCipher};
use crate::device::Qcow2Device;
use crate::encryption::{CRYPT_AES, CRYPT_LUKS};
use crate::header::Header;

/// Options only LUKS accepts (qemu: "Parameter '…' is unexpected" for aes).
const LUKS_ONLY: &[&str] = &[
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

/// A new image's encryption, prepared before its header is written.
pub(crate) struct NewEncryption {
    /// The LUKS header area (phdr + key material), or `None` for legacy AES.
    area: Option<Zeroizing<Vec<u8>>>,
}

fn required() -> Error {
    Error::Key("Parameter 'encrypt.key-secret' is required for cipher".into())
}

/// PBKDF2 iterations that take `ms` milliseconds here, measured as qemu does (by timing
/// a doubling number of iterations), at least 1000 and at most the open limit.
pub(crate) fn iterations_for(hash: HashAlg, out_len: usize, ms: u64) -> u32 {
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let salt = [0x5au8; 32];
    let mut n: u32 = 1 << 10;
    let (n, took) = loop {
        let t = Instant::now();
        hash.pbkdf2(b"diskimg iteration measurement", &salt, n, &mut out);
        let took = t.elapsed();
        if took >= Duration::from_millis(25) || n >= MAX_ITERATIONS {
            break (n, took);
        }
        n = n.saturating_mul(2);
    };
    let per_ms = u128::from(n) * 1000 / took.as_micros().max(1);
    let total = per_ms.saturating_mul(u128::from(ms));
    u32::try_from(total)
        .unwrap_or(u32::MAX)
        .clamp(1000, MAX_ITERATIONS)
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
        if let Some(k) = LUKS_ONLY.iter().find(|k| o.get(k).is_some()) {
            return Err(Error::invalid(format!("Parameter '{k}' is unexpected")));
        }
        return Ok(Some(NewEncryption { area: None }));
    }
    let alg = o
        .take_enum(
            "encrypt.cipher-alg",
            &[
                "aes-128",
                "aes-192",
                "aes-256",
                "cast5-128",
                "serpent-128",
                "serpent-192",
                "serpent-256",
                "twofish-128",
                "twofish-192",
                "twofish-256",
                "sm4",
            ],
        )?
        .unwrap_or_else(|| "aes-256".into());
    let key_len: usize = match alg.as_str() {
        "aes-128" => 16,
        "aes-192" => 24,
        "aes-256" => 32,
        other => {
            return Err(Error::unsupported(
                "qcow2",
                format!("cipher algorithm '{other}'"),
            ));
        }
    };
    let mode = o
        .take_enum("encrypt.cipher-mode", &["ecb", "cbc", "xts", "ctr"])?
        .unwrap_or_else(|| "xts".into());
    if mode == "ctr" {
        return Err(Error::unsupported("qcow2", "cipher mode 'ctr'"));
    }
    let ivgen = o
        .take_enum("encrypt.ivgen-alg", &["plain", "plain64", "essiv"])?
        .unwrap_or_else(|| "plain64".into());
    let hash_names = [
        "md5",
        "sha1",
        "sha224",
        "sha256",
        "sha384",
        "sha512",
        "ripemd160",
    ];
    let iv_hash = o.take_enum("encrypt.ivgen-hash-alg", &hash_names)?;
    let hash = o
        .take_enum("encrypt.hash-alg", &hash_names)?
        .unwrap_or_else(|| "sha256".into());
    let hash = HashAlg::parse(&hash)?;
    let iter_time = o.take_u64("encrypt.iter-time")?.unwrap_or(2000);
    let cipher_mode = if ivgen == "essiv" {
        let ih = iv_hash.unwrap_or_else(|| "sha256".into());
        let ihash = HashAlg::parse(&ih)?;
        let n = ihash.digest_len();
        if !matches!(n, 16 | 24 | 32) {
            return Err(Error::invalid(format!(
                "No AES cipher with key size {n} available"
            )));
        }
        format!("{mode}-essiv:{ih}")
    } else {
        format!("{mode}-{ivgen}")
    };
    let mk_len = if mode == "xts" { 2 * key_len } else { key_len };
    let mut mk = Zeroizing::new(vec![0u8; mk_len]);
    random_bytes(&mut mk)?;
    // The data cipher must be one we can run (e.g. XTS needs plain/plain64 IVs).
    let (m, iv) = crate::crypto::luks::parse_mode(&cipher_mode)?;
    SectorCipher::new(m, iv, &mk)?;
    let slot_iters = iterations_for(hash, mk_len, iter_time);
    let digest_iters = iterations_for(hash, 20, iter_time) / 8;
    let params = LuksParams {
        cipher_mode,
        hash,
        iterations: slot_iters,
        digest_iterations: digest_iters,
    };
    let (_, area) = LuksHeader::create(&params, &mk, pass)?;
    Ok(Some(NewEncryption {
        area: Some(Zeroizing::new(area)),
    }))
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
