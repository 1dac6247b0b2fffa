//! LUKS anti-forensic information splitter (AFsplit / AFmerge, LUKS1 spec section 2.4).
//!
//! A key of `n` bytes is stored as `stripes` blocks of `n` bytes: stripes−1 random blocks and
//! a last block chosen so that folding all of them with the hash-based diffusion function
//! yields the key. Destroying any one stripe destroys the key.

use diskimg_blockio::{Error, Result};

use crate::hash::HashAlg;

/// The diffusion function H: each digest-sized piece `j` of `block` becomes
/// `hash(be32(j) || piece)` truncated to the piece's length.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dlen = hash.digest_len();
    for (j, piece) in block.chunks_mut(dlen).enumerate() {
        let idx = u32::try_from(j).unwrap_or(u32::MAX).to_be_bytes();
        let d = hash.digest_parts(&[&idx, piece]);
        let n = piece.len();
        piece.copy_from_slice(d.get(..n).unwrap_or(&d));
    }
}

/// Recovers a `key_len`-byte key from `material` (`stripes × key_len` bytes).
pub fn merge(hash: HashAlg, material: &[u8], key_len: usize, stripes: u32) -> Result<Vec<u8>> {
    let stripes = usize::try_from(stripes).map_err(|_| Error::internal("too many stripes"))?;
    let need = key_len
        .checked_mul(stripes)
        .ok_or(Error::internal("key material size overflow"))?;
    if stripes == 0 || key_len == 0 || material.len() < need {
        return Err(Error::corrupt_unplaced(
            "luks",
            "LUKS key material too short",
        ));
    }
    let mut d = vec![0u8; key_len];
    let mut blocks = material.chunks_exact(key_len).take(stripes);
    for _ in 0..stripes - 1 {
        let b = blocks.next().unwrap_or(&[]);
        d.iter_mut().zip(b).for_each(|(x, y)| *x ^= y);
        diffuse(hash, &mut d);
    }
    let last = blocks.next().unwrap_or(&[]);
    d.iter_mut().zip(last).for_each(|(x, y)| *x ^= y);
    Ok(d)
}

/// Splits `key` into `stripes` blocks using `random` for the first stripes−1.
pub fn split(hash: HashAlg, key: &[u8], stripes: u32, random: &[u8]) -> Result<Vec<u8>> {
    let stripes = usize::try_from(stripes).map_err(|_| Error::internal("too many stripes"))?;
    let n = key.len();
    let rnd_len = n
        .checked_mul(stripes.saturating_sub(1))
        .ok_or(Error::internal("key material size overflow"))?;
    if stripes == 0 || random.len() < rnd_len {
        return Err(Error::internal("not enough random bytes for AF split"));
    }
    let mut out = random.get(..rnd_len).unwrap_or(&[]).to_vec();
    let mut d = vec![0u8; n];
    for b in out.chunks_exact(n) {
        d.iter_mut().zip(b).for_each(|(x, y)| *x ^= y);
        diffuse(hash, &mut d);
    }
    out.extend(d.iter().zip(key).map(|(x, k)| x ^ k));
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_recovers_key() {
        let key: Vec<u8> = (0..64u8).collect();
        let random: Vec<u8> = (0..64 * 3999u32).map(|i| (i * 31 % 256) as u8).collect();
        for h in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let m = split(h, &key, 4000, &random).unwrap();
            assert_eq!(m.len(), 64 * 4000);
            assert_eq!(merge(h, &m, 64, 4000).unwrap(), key);
            let mut broken = m.clone();
            broken[5] ^= 1;
            assert_ne!(merge(h, &broken, 64, 4000).unwrap(), key);
        }
        assert!(merge(HashAlg::Sha256, &[0; 10], 64, 4000).is_err());
        assert!(merge(HashAlg::Sha256, &[0; 10], 10, 0).is_err());
    }
}
