//! XTS-AES (IEEE 1619) over whole 512-byte sectors, with each sector's 32 blocks going
//! through the AES implementation's multi-block path.
//!
//! The `xts-mode` crate enciphers one 16-byte block at a time; with AES-NI a single block
//! waits for the whole latency of its rounds, while eight independent blocks are
//! pipelined. XTS blocks of one sector are independent once their tweaks are known (each
//! tweak is the previous one multiplied by α in GF(2¹²⁸)), so a sector is done as: tweak
//! = E(K2, IV); mask every block with its tweak; encrypt or decrypt all 32 blocks in one
//! call; mask again. Sectors are always whole multiples of the block size here, so the
//! ciphertext stealing of the standard never applies. `cargo bench -p diskimg-luks
//! --bench cipher` compares this with `xts-mode` (docs/benchmarks.md); the tests check
//! both give identical bytes.

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, BlockSizeUser};

use crate::cipher::SECTOR;

/// One AES block.
type Block = GenericArray<u8, U16>;

/// Blocks per sector.
const BLOCKS: usize = SECTOR / 16;

/// Multiplication by α (x) in GF(2¹²⁸) with the XTS (little-endian) bit order and the
/// polynomial x¹²⁸ + x⁷ + x² + x + 1.
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

fn load(bytes: &[u8]) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(bytes);
    u128::from_le_bytes(a)
}

/// An XTS key pair: `data` enciphers the blocks, `tweak` the per-sector IV.
#[derive(Clone)]
pub(crate) struct Xts<C> {
    data: C,
    tweak: C,
}

impl<C> Xts<C>
where
    C: BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16>,
{
    pub(crate) fn new(data: C, tweak: C) -> Self {
        Self { data, tweak }
    }

    /// Encrypts or decrypts `buf` in place. Only whole sectors are processed (callers
    /// check the length); sector `i` of `buf` uses the IV `iv(first + i)`.
    pub(crate) fn apply(
        &self,
        buf: &mut [u8],
        first: u64,
        iv: impl Fn(u64) -> [u8; 16],
        encrypt: bool,
    ) {
        let mut blocks = [Block::default(); BLOCKS];
        let mut tweaks = [0u128; BLOCKS];
        for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let mut t = Block::from(iv(first.wrapping_add(i as u64)));
            self.tweak.encrypt_block(&mut t);
            let mut t = load(&t);
            for ((b, tw), src) in blocks
                .iter_mut()
                .zip(tweaks.iter_mut())
                .zip(sector.chunks_exact(16))
            {
                *tw = t;
                b.copy_from_slice(&(load(src) ^ t).to_le_bytes());
                t = mul_alpha(t);
            }
            if encrypt {
                self.data.encrypt_blocks(&mut blocks);
            } else {
                self.data.decrypt_blocks(&mut blocks);
            }
            for ((b, tw), dst) in blocks
                .iter()
                .zip(tweaks.iter())
                .zip(sector.chunks_exact_mut(16))
            {
                dst.copy_from_slice(&(load(b) ^ tw).to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use aes::cipher::KeyInit;
    use aes::{Aes128, Aes256};

    fn iv(s: u64) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&s.to_le_bytes());
        t
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn matches_xts_mode_crate() {
        let key = pattern(64, 3);
        let (k1, k2) = key.split_at(32);
        let ours = Xts::new(
            Aes256::new_from_slice(k1).unwrap(),
            Aes256::new_from_slice(k2).unwrap(),
        );
        let theirs = xts_mode::Xts128::new(
            Aes256::new_from_slice(k1).unwrap(),
            Aes256::new_from_slice(k2).unwrap(),
        );
        for first in [0u64, 1, 7, 0xffff_ffff, u64::MAX - 3] {
            let plain = pattern(4 * SECTOR, first as u8);
            let mut a = plain.clone();
            let mut b = plain.clone();
            ours.apply(&mut a, first, iv, true);
            theirs.encrypt_area(&mut b, SECTOR, u128::from(first), |s| {
                iv(u64::try_from(s).unwrap_or(u64::MAX))
            });
            assert_eq!(a, b, "first sector {first}");
            assert_ne!(a, plain);
            ours.apply(&mut a, first, iv, false);
            assert_eq!(a, plain);
        }
    }

    /// IEEE 1619-2007 test vector 4 (XTS-AES-128, data unit sequence number 0): the
    /// first and last 16 bytes of the 512-byte ciphertext (the last ones as Python's
    /// `cryptography` computes them).
    #[test]
    fn ieee_1619_vector_4() {
        let k1: [u8; 16] = [
            0x27, 0x18, 0x28, 0x18, 0x28, 0x45, 0x90, 0x45, 0x23, 0x53, 0x60, 0x28, 0x74, 0x71,
            0x35, 0x26,
        ];
        let k2: [u8; 16] = [
            0x31, 0x41, 0x59, 0x26, 0x53, 0x58, 0x97, 0x93, 0x23, 0x84, 0x62, 0x64, 0x33, 0x83,
            0x27, 0x95,
        ];
        let x = Xts::new(
            Aes128::new_from_slice(&k1).unwrap(),
            Aes128::new_from_slice(&k2).unwrap(),
        );
        let mut buf: Vec<u8> = (0..SECTOR).map(|i| i as u8).collect();
        x.apply(&mut buf, 0, iv, true);
        assert_eq!(
            &buf[..16],
            &[
                0x27, 0xa7, 0x47, 0x9b, 0xef, 0xa1, 0xd4, 0x76, 0x48, 0x9f, 0x30, 0x8c, 0xd4, 0xcf,
                0xa6, 0xe2
            ]
        );
        assert_eq!(
            &buf[SECTOR - 16..],
            &[
                0x0a, 0x28, 0x2d, 0xf9, 0x20, 0x14, 0x7b, 0xea, 0xbe, 0x42, 0x1e, 0xe5, 0x31, 0x9d,
                0x05, 0x68
            ]
        );
    }
}
