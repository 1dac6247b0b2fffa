//! New LUKS headers from qemu's create options (`cipher-alg`, `cipher-mode`, `ivgen-alg`,
//! `ivgen-hash-alg`, `hash-alg`, `iter-time`; qcow2 names them with an `encrypt.`
//! prefix), with qemu's defaults (aes-256, xts, plain64, sha256, 2000 ms) and its PBKDF2
//! iteration measurement.

use std::time::{Duration, Instant};

use diskimg_blockio::{Error, OptionList, Result};
use zeroize::Zeroizing;

use crate::hash::random_bytes;
use crate::header::{MAX_ITERATIONS, parse_mode};
use crate::{HashAlg, LuksHeader, LuksParams, SectorCipher};

/// The LUKS create options besides the key secret, without a prefix.
pub const LUKS_CREATE_KEYS: &[&str] = &[
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "iter-time",
];

const HASHES: &[&str] = &[
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "ripemd160",
];

/// PBKDF2 iterations that take `ms` milliseconds here, measured as qemu does (by timing
/// a doubling number of iterations), at least 1000 and at most the open limit.
pub fn iterations_for(hash: HashAlg, out_len: usize, ms: u64) -> u32 {
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

/// Takes the LUKS options named `PREFIXkey` from `o` and builds a new header with a fresh
/// random master key in key slot 0 for `passphrase`; returns the header and the whole
/// header area (phdr and key material) to store.
pub fn new_area(
    o: &mut OptionList,
    prefix: &str,
    passphrase: &[u8],
) -> Result<(LuksHeader, Zeroizing<Vec<u8>>)> {
    let k = |name: &str| format!("{prefix}{name}");
    let alg = o
        .take_enum(
            &k("cipher-alg"),
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
                "luks",
                format!("cipher algorithm '{other}'"),
            ));
        }
    };
    let mode = o
        .take_enum(&k("cipher-mode"), &["ecb", "cbc", "xts", "ctr"])?
        .unwrap_or_else(|| "xts".into());
    if mode == "ctr" {
        return Err(Error::unsupported("luks", "cipher mode 'ctr'"));
    }
    let ivgen = o
        .take_enum(&k("ivgen-alg"), &["plain", "plain64", "essiv"])?
        .unwrap_or_else(|| "plain64".into());
    let iv_hash = o.take_enum(&k("ivgen-hash-alg"), HASHES)?;
    let hash = o
        .take_enum(&k("hash-alg"), HASHES)?
        .unwrap_or_else(|| "sha256".into());
    let hash = HashAlg::parse(&hash)?;
    let iter_time = o.take_u64(&k("iter-time"))?.unwrap_or(2000);
    let cipher_mode = if ivgen == "essiv" {
        let ih = iv_hash.unwrap_or_else(|| "sha256".into());
        let n = HashAlg::parse(&ih)?.digest_len();
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
    let (m, iv) = parse_mode(&cipher_mode)?;
    SectorCipher::new(m, iv, &mk)?;
    let params = LuksParams {
        cipher_mode,
        hash,
        iterations: iterations_for(hash, mk_len, iter_time),
        digest_iterations: iterations_for(hash, 20, iter_time) / 8,
    };
    let (header, area) = LuksHeader::create(&params, &mk, passphrase)?;
    Ok((header, Zeroizing::new(area)))
}
