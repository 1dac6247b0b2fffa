//! Sector ciphers: AES in XTS, CBC or ECB mode with qemu's IV generators.
//!
//! qemu's crypto layer names a data cipher as `cipher-alg` (aes-128/192/256), `cipher-mode`
//! (xts, cbc, ecb) and `ivgen-alg` (plain, plain64, essiv with `ivgen-hash-alg`). A
//! [`SectorCipher`] encrypts and decrypts whole 512-byte sectors numbered by the caller.

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use diskimg_blockio::{Error, Result};

use crate::hash::HashAlg;
use crate::xts::Xts;

/// The sector size the qcow2 crypto layers use.
pub const SECTOR: usize = 512;

/// An AES block cipher of any key size.
#[derive(Clone)]
pub(crate) enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    pub(crate) fn new(key: &[u8]) -> Result<Self> {
        let bad = || Error::Key("invalid AES key length".into());
        Ok(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).map_err(|_| bad())?),
            24 => Aes::A192(Aes192::new_from_slice(key).map_err(|_| bad())?),
            32 => Aes::A256(Aes256::new_from_slice(key).map_err(|_| bad())?),
            _ => return Err(bad()),
        })
    }

    pub(crate) fn encrypt_block(&self, b: &mut [u8; 16]) {
        let b = GenericArray::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }

    /// Decrypts independent blocks (the AES implementation pipelines them).
    fn decrypt_blocks(&self, blocks: &mut [GenericArray<u8, U16>]) {
        match self {
            Aes::A128(c) => c.decrypt_blocks(blocks),
            Aes::A192(c) => c.decrypt_blocks(blocks),
            Aes::A256(c) => c.decrypt_blocks(blocks),
        }
    }

    /// Encrypts independent blocks (the AES implementation pipelines them).
    fn encrypt_blocks(&self, blocks: &mut [GenericArray<u8, U16>]) {
        match self {
            Aes::A128(c) => c.encrypt_blocks(blocks),
            Aes::A192(c) => c.encrypt_blocks(blocks),
            Aes::A256(c) => c.encrypt_blocks(blocks),
        }
    }

    #[cfg(test)]
    pub(crate) fn decrypt_block(&self, b: &mut [u8; 16]) {
        let b = GenericArray::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.decrypt_block(b),
            Aes::A192(c) => c.decrypt_block(b),
            Aes::A256(c) => c.decrypt_block(b),
        }
    }
}

/// Block cipher mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// XEX-based tweaked codebook with ciphertext stealing (the key is two AES keys).
    Xts,
    /// Cipher block chaining, IV per sector.
    Cbc,
    /// Electronic codebook (no IV; insecure, read support only in practice).
    Ecb,
}

impl Mode {
    /// Parses qemu's / LUKS's mode name.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "xts" => Ok(Mode::Xts),
            "cbc" => Ok(Mode::Cbc),
            "ecb" => Ok(Mode::Ecb),
            _ => Err(Error::unsupported("luks", format!("cipher mode '{s}'"))),
        }
    }
}

/// How the per-sector IV is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGen {
    /// Sector number, 32-bit little-endian, zero padded.
    Plain,
    /// Sector number, 64-bit little-endian, zero padded.
    Plain64,
    /// Sector number encrypted with a key derived by hashing the data key.
    Essiv(HashAlg),
    /// No IV (ECB).
    None,
}

enum ModeState {
    Xts(XtsAes),
    Iv(Box<IvState>),
}

struct IvState {
    aes: Aes,
    mode: Mode,
    essiv: Option<Aes>,
}

enum XtsAes {
    X128(Box<Xts<Aes128>>),
    X192(Box<Xts<Aes192>>),
    X256(Box<Xts<Aes256>>),
}

/// A keyed sector cipher.
pub struct SectorCipher {
    state: ModeState,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("ivgen", &self.ivgen)
            .finish_non_exhaustive()
    }
}

fn tweak(ivgen: IvGen, sector: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    let v = match ivgen {
        IvGen::Plain => sector & 0xffff_ffff,
        _ => sector,
    };
    t[..8].copy_from_slice(&v.to_le_bytes());
    t
}

impl SectorCipher {
    /// Keys a cipher. For XTS `key` holds both halves (32, 48 or 64 bytes).
    pub fn new(mode: Mode, ivgen: IvGen, key: &[u8]) -> Result<Self> {
        let state = match mode {
            Mode::Xts => {
                if !matches!(ivgen, IvGen::Plain | IvGen::Plain64) {
                    return Err(Error::unsupported(
                        "luks",
                        "XTS needs a plain or plain64 IV",
                    ));
                }
                let half = key.len() / 2;
                let (k1, k2) = key.split_at(half);
                let bad = || Error::Key("invalid XTS key length".into());
                let x = match half {
                    16 => XtsAes::X128(Box::new(Xts::new(
                        Aes128::new_from_slice(k1).map_err(|_| bad())?,
                        Aes128::new_from_slice(k2).map_err(|_| bad())?,
                    ))),
                    24 => XtsAes::X192(Box::new(Xts::new(
                        Aes192::new_from_slice(k1).map_err(|_| bad())?,
                        Aes192::new_from_slice(k2).map_err(|_| bad())?,
                    ))),
                    32 => XtsAes::X256(Box::new(Xts::new(
                        Aes256::new_from_slice(k1).map_err(|_| bad())?,
                        Aes256::new_from_slice(k2).map_err(|_| bad())?,
                    ))),
                    _ => return Err(bad()),
                };
                ModeState::Xts(x)
            }
            Mode::Cbc | Mode::Ecb => {
                let essiv = match ivgen {
                    IvGen::Essiv(h) => {
                        let digest = h.digest(key);
                        // ESSIV keys a cipher of the same algorithm with the hash of the key,
                        // truncated to a valid AES key size.
                        let n = match digest.len() {
                            n if n >= 32 => 32,
                            n if n >= 24 => 24,
                            _ => 16,
                        };
                        Some(Aes::new(digest.get(..n).unwrap_or(&digest))?)
                    }
                    _ => None,
                };
                ModeState::Iv(Box::new(IvState {
                    aes: Aes::new(key)?,
                    mode,
                    essiv,
                }))
            }
        };
        Ok(Self { state, ivgen })
    }

    fn iv(&self, essiv: Option<&Aes>, sector: u64) -> [u8; 16] {
        let mut iv = tweak(self.ivgen, sector);
        match (self.ivgen, essiv) {
            (IvGen::Essiv(_), Some(e)) => e.encrypt_block(&mut iv),
            (IvGen::None, _) => iv = [0; 16],
            _ => {}
        }
        iv
    }

    fn check_len(buf: &[u8]) -> Result<()> {
        if !buf.len().is_multiple_of(SECTOR) {
            return Err(Error::invalid(
                "encrypted I/O must be whole 512-byte sectors",
            ));
        }
        Ok(())
    }

    /// Encrypts `buf` (whole sectors) in place; its first sector is number `sector`.
    pub fn encrypt(&self, buf: &mut [u8], sector: u64) -> Result<()> {
        self.apply(buf, sector, true)
    }

    /// Decrypts `buf` (whole sectors) in place; its first sector is number `sector`.
    pub fn decrypt(&self, buf: &mut [u8], sector: u64) -> Result<()> {
        self.apply(buf, sector, false)
    }

    fn apply(&self, buf: &mut [u8], sector: u64, encrypt: bool) -> Result<()> {
        Self::check_len(buf)?;
        match &self.state {
            ModeState::Xts(x) => {
                let f = |s: u64| tweak(self.ivgen, s);
                match x {
                    XtsAes::X128(x) => x.apply(buf, sector, f, encrypt),
                    XtsAes::X192(x) => x.apply(buf, sector, f, encrypt),
                    XtsAes::X256(x) => x.apply(buf, sector, f, encrypt),
                }
            }
            ModeState::Iv(st) => {
                let IvState { aes, mode, essiv } = st.as_ref();
                let mut blocks = [GenericArray::<u8, U16>::default(); SECTOR / 16];
                for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
                    let iv = self.iv(essiv.as_ref(), sector.wrapping_add(i as u64));
                    match (mode, encrypt) {
                        // CBC encryption chains each block to the previous ciphertext
                        // block: one block at a time.
                        (Mode::Cbc, true) => {
                            let mut prev = iv;
                            for block in s.chunks_exact_mut(16) {
                                let mut b = [0u8; 16];
                                b.iter_mut()
                                    .zip(block.iter().zip(&prev))
                                    .for_each(|(x, (p, v))| *x = p ^ v);
                                aes.encrypt_block(&mut b);
                                prev = b;
                                block.copy_from_slice(&b);
                            }
                        }
                        // CBC decryption and ECB work on independent blocks: the whole
                        // sector in one call.
                        _ => {
                            for (b, src) in blocks.iter_mut().zip(s.chunks_exact(16)) {
                                b.copy_from_slice(src);
                            }
                            if encrypt {
                                aes.encrypt_blocks(&mut blocks);
                            } else {
                                aes.decrypt_blocks(&mut blocks);
                            }
                            if *mode == Mode::Cbc {
                                // Plaintext block j = D(C_j) xor C_(j-1), C_(-1) = IV;
                                // the ciphertext is still in `s` (written back below).
                                let prevs = std::iter::once(&iv[..]).chain(s.chunks_exact(16));
                                for (b, prev) in blocks.iter_mut().zip(prevs) {
                                    b.iter_mut().zip(prev).for_each(|(x, p)| *x ^= p);
                                }
                            }
                            for (b, dst) in blocks.iter().zip(s.chunks_exact_mut(16)) {
                                dst.copy_from_slice(b);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// CBC and ECB, one block at a time: the definition the batched code must match.
    fn reference(aes: &Aes, cbc: bool, iv: [u8; 16], sector: &mut [u8], encrypt: bool) {
        let mut prev = iv;
        for block in sector.chunks_exact_mut(16) {
            let mut b: [u8; 16] = block.try_into().unwrap();
            let ct = b;
            if encrypt {
                if cbc {
                    b.iter_mut().zip(&prev).for_each(|(x, p)| *x ^= p);
                }
                aes.encrypt_block(&mut b);
                prev = b;
            } else {
                aes.decrypt_block(&mut b);
                if cbc {
                    b.iter_mut().zip(&prev).for_each(|(x, p)| *x ^= p);
                }
                prev = ct;
            }
            block.copy_from_slice(&b);
        }
    }

    #[test]
    fn batched_cbc_and_ecb_match_block_by_block() {
        let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7)).collect();
        let data: Vec<u8> = (0..3 * SECTOR).map(|i| (i * 13 % 251) as u8).collect();
        for (mode, ivgen) in [
            (Mode::Cbc, IvGen::Plain64),
            (Mode::Cbc, IvGen::Essiv(HashAlg::Sha256)),
            (Mode::Ecb, IvGen::None),
        ] {
            let c = SectorCipher::new(mode, ivgen, &key).unwrap();
            let ModeState::Iv(st) = &c.state else {
                panic!("not an IV mode")
            };
            for encrypt in [true, false] {
                let mut ours = data.clone();
                let mut want = data.clone();
                c.apply(&mut ours, 40, encrypt).unwrap();
                for (i, s) in want.chunks_exact_mut(SECTOR).enumerate() {
                    let iv = c.iv(st.essiv.as_ref(), 40 + i as u64);
                    reference(&st.aes, mode == Mode::Cbc, iv, s, encrypt);
                }
                assert_eq!(ours, want, "{mode:?} {ivgen:?} encrypt={encrypt}");
            }
        }
    }

    #[test]
    fn round_trips_every_mode() {
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 251) as u8).collect();
        for (mode, iv, klen) in [
            (Mode::Xts, IvGen::Plain64, 32),
            (Mode::Xts, IvGen::Plain64, 64),
            (Mode::Xts, IvGen::Plain, 48),
            (Mode::Cbc, IvGen::Plain64, 16),
            (Mode::Cbc, IvGen::Essiv(HashAlg::Sha256), 32),
            (Mode::Cbc, IvGen::Plain, 24),
            (Mode::Ecb, IvGen::None, 32),
        ] {
            let key: Vec<u8> = (0..klen).map(|i: u32| i as u8).collect();
            let c = SectorCipher::new(mode, iv, &key).unwrap();
            let mut buf = data.clone();
            c.encrypt(&mut buf, 77).unwrap();
            assert_ne!(buf, data);
            c.decrypt(&mut buf, 77).unwrap();
            assert_eq!(buf, data, "{mode:?} {iv:?}");
            // Sector numbering matters (except ECB).
            let mut a = data[..512].to_vec();
            let mut b = data[..512].to_vec();
            c.encrypt(&mut a, 1).unwrap();
            c.encrypt(&mut b, 2).unwrap();
            assert_eq!(a == b, mode == Mode::Ecb);
        }
        assert!(SectorCipher::new(Mode::Xts, IvGen::Plain64, &[0; 20]).is_err());
        let c = SectorCipher::new(Mode::Cbc, IvGen::Plain64, &[0; 16]).unwrap();
        assert!(c.encrypt(&mut [0u8; 100], 0).is_err());
    }

    #[test]
    fn aes_128_cbc_plain64_matches_a_known_vector() {
        // NIST SP 800-38A F.2.1 CBC-AES128 first block with IV = plain64(sector 0) = zero IV
        // is not a NIST vector, so check via the definition: C0 = E(P0 xor IV).
        let key = [
            0x2bu8, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf,
            0x4f, 0x3c,
        ];
        let aes = Aes::new(&key).unwrap();
        let mut p0 = [
            0x6bu8, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93,
            0x17, 0x2a,
        ];
        // FIPS-197 / SP 800-38A ECB-AES128 vector: E(P0) = 3ad77bb4 0d7a3660 a89ecaf3 2466ef97.
        aes.encrypt_block(&mut p0);
        assert_eq!(p0[..4], [0x3a, 0xd7, 0x7b, 0xb4]);
        assert_eq!(p0[12..], [0x24, 0x66, 0xef, 0x97]);
    }
}
