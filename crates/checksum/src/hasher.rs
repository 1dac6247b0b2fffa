//! Incremental digests with a zero fast path: [`Hasher`].
//!
//! The blkhash construction (blkhash 0.10+, blksum's default) is
//!
//! ```text
//! H( H(block 0) || H(block 1) || ... || H(block N-1) || le64(message length) )
//! ```
//!
//! with H = SHA-256 and blocks of [`BLOCK_SIZE`] bytes at multiples of the block size
//! from the start of the message (the last one may be shorter). A block of zeroes
//! always contributes the same digest, so zero ranges are hashed without being read:
//! one precomputed block digest per block.

use std::sync::OnceLock;

use sha2::{Digest as _, Sha256};

/// blkhash's block size (blksum's compiled default): 64 KiB.
pub const BLOCK_SIZE: usize = 64 * 1024;

/// Length of a SHA-256 digest.
pub const MD_LEN: usize = 32;

/// A block's SHA-256 digest.
pub type BlockDigest = [u8; MD_LEN];

/// 64 KiB of zeroes, fed to the plain digests for zero ranges.
static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// The digest of a whole block of zeroes (computed once).
pub fn zero_block_digest() -> BlockDigest {
    static MD: OnceLock<BlockDigest> = OnceLock::new();
    *MD.get_or_init(|| Sha256::digest(ZEROS).into())
}

/// The digest of one block of guest bytes: the precomputed one for a full zero block.
pub fn block_digest(block: &[u8]) -> BlockDigest {
    if block.len() == BLOCK_SIZE && diskimg_convert::is_zero(block) {
        zero_block_digest()
    } else {
        Sha256::digest(block).into()
    }
}

/// Which digest of the guest content to compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// blkhash with SHA-256 and 64 KiB blocks: equal to `blksum` (blkhash 0.10+) on the
    /// raw guest bytes. The default.
    #[default]
    Blkhash,
    /// SHA-256 of the plain guest bytes (equal to `sha256sum` of a raw image).
    Sha256,
    /// BLAKE3 of the plain guest bytes (equal to `b3sum` of a raw image).
    Blake3,
}

impl Algorithm {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Blkhash => "blkhash-sha256",
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3 => "blake3",
        }
    }

    /// Parses a name: `blkhash` / `blkhash-sha256` / `blksum`, `sha256`, `blake3`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "blkhash" | "blkhash-sha256" | "blksum" => Algorithm::Blkhash,
            "sha256" => Algorithm::Sha256,
            "blake3" => Algorithm::Blake3,
            _ => return None,
        })
    }
}

/// A finished digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// How it was computed.
    pub algorithm: Algorithm,
    /// The digest bytes.
    pub bytes: Vec<u8>,
}

impl Digest {
    /// Lower-case hex, as `sha256sum` and `blksum` print it.
    pub fn hex(&self) -> String {
        use std::fmt::Write;
        self.bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

/// The blkhash state: the outer hash and the bytes of an incomplete block.
#[derive(Clone, Debug)]
struct Blk {
    outer: Sha256,
    pending: Vec<u8>,
}

#[derive(Clone, Debug)]
enum Kind {
    Blk(Blk),
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

/// An incremental digest of a byte stream, with [`Hasher::zero`] for ranges known to be
/// zero.
#[derive(Clone, Debug)]
pub struct Hasher {
    algorithm: Algorithm,
    kind: Kind,
    length: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new(algorithm: Algorithm) -> Self {
        let kind = match algorithm {
            Algorithm::Blkhash => Kind::Blk(Blk {
                outer: Sha256::new(),
                pending: Vec::new(),
            }),
            Algorithm::Sha256 => Kind::Sha256(Sha256::new()),
            Algorithm::Blake3 => Kind::Blake3(Box::new(blake3::Hasher::new())),
        };
        Self {
            algorithm,
            kind,
            length: 0,
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.length
    }

    /// True before anything was hashed.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.length += data.len() as u64;
        match &mut self.kind {
            Kind::Sha256(h) => h.update(data),
            Kind::Blake3(h) => {
                h.update(data);
            }
            Kind::Blk(b) => {
                let mut rest = data;
                if !b.pending.is_empty() {
                    let take = (BLOCK_SIZE - b.pending.len()).min(rest.len());
                    let (head, tail) = rest.split_at(take);
                    b.pending.extend_from_slice(head);
                    rest = tail;
                    if b.pending.len() == BLOCK_SIZE {
                        b.outer.update(block_digest(&b.pending));
                        b.pending.clear();
                    }
                }
                let mut blocks = rest.chunks_exact(BLOCK_SIZE);
                for block in &mut blocks {
                    b.outer.update(block_digest(block));
                }
                b.pending.extend_from_slice(blocks.remainder());
            }
        }
    }

    /// Adds `len` zero bytes without anyone having to read them.
    pub fn zero(&mut self, len: u64) {
        let Kind::Blk(b) = &mut self.kind else {
            let mut left = len;
            while left > 0 {
                let n = usize::try_from(left.min(BLOCK_SIZE as u64)).unwrap_or(BLOCK_SIZE);
                self.update(ZEROS.get(..n).unwrap_or_default());
                left -= n as u64;
            }
            return;
        };
        self.length += len;
        let mut left = len;
        if !b.pending.is_empty() {
            let take =
                (BLOCK_SIZE - b.pending.len()).min(usize::try_from(left).unwrap_or(BLOCK_SIZE));
            b.pending.resize(b.pending.len() + take, 0);
            left -= take as u64;
            if b.pending.len() == BLOCK_SIZE {
                b.outer.update(block_digest(&b.pending));
                b.pending.clear();
            }
        }
        let md = zero_block_digest();
        for _ in 0..left / BLOCK_SIZE as u64 {
            b.outer.update(md);
        }
        let tail = usize::try_from(left % BLOCK_SIZE as u64).unwrap_or(0);
        b.pending.resize(tail, 0);
    }

    /// Adds digests of whole blocks computed elsewhere (in parallel), covering `len`
    /// bytes. Only at a block boundary of the message, and only blkhash: anything else
    /// is a caller bug, answered with `false` and no change.
    pub(crate) fn add_block_digests(&mut self, digests: &[BlockDigest], len: u64) -> bool {
        match &mut self.kind {
            Kind::Blk(b) if b.pending.is_empty() => {
                for md in digests {
                    b.outer.update(md);
                }
                self.length += len;
                true
            }
            _ => false,
        }
    }

    /// The digest.
    pub fn finalize(self) -> Digest {
        let bytes = match self.kind {
            Kind::Sha256(h) => h.finalize().to_vec(),
            Kind::Blake3(h) => h.finalize().as_bytes().to_vec(),
            Kind::Blk(mut b) => {
                if !b.pending.is_empty() {
                    b.outer.update(block_digest(&b.pending));
                }
                b.outer.update(self.length.to_le_bytes());
                b.outer.finalize().to_vec()
            }
        };
        Digest {
            algorithm: self.algorithm,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = BLOCK_SIZE;

    fn blk(parts: &[(u8, usize)]) -> String {
        let mut h = Hasher::new(Algorithm::Blkhash);
        for &(byte, len) in parts {
            if byte == b'-' {
                h.zero(len as u64);
            } else {
                h.update(&vec![byte; len]);
            }
        }
        h.finalize().hex()
    }

    /// The expected digests are blkhash's published test vectors (its
    /// `test/blkhash-test.c`, sha256, 64 KiB blocks); `-` is a zero range added
    /// without data (`blkhash_zero`).
    #[test]
    fn blkhash_published_vectors() {
        let full_a = "2e3a5f57d5e726ee5de62db1a85ff816f4fa6ea4627807d9a51bdc4c883e165e";
        let full_zero = "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af";
        let half_a = "9467334d6d7668a2f06898185b5cddc78cdfbd962f50c6bf250101f03a0e54dc";
        let half_zero = "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56";
        let eight_zero = "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d";
        let gib_zero = "c6d6562c3074a2caa0ceea3e1f460f3af678c792ed05e64157eb51e68ae5260d";
        let unaligned = "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c";
        assert_eq!(blk(&[(b'A', B)]), full_a);
        assert_eq!(blk(&[(0, B)]), full_zero);
        assert_eq!(blk(&[(b'-', B)]), full_zero);
        assert_eq!(blk(&[(b'A', B / 2)]), half_a);
        assert_eq!(blk(&[(0, B / 2)]), half_zero);
        assert_eq!(blk(&[(b'-', B / 2)]), half_zero);
        assert_eq!(blk(&[(b'-', 8 * B)]), eight_zero);
        assert_eq!(blk(&[(0, 8 * B)]), eight_zero);
        assert_eq!(blk(&[(b'-', 1 << 30)]), gib_zero);
        assert_eq!(blk(&[(b'-', 8 * B), (b'-', B / 2)]), unaligned);
        assert_eq!(blk(&[(0, 8 * B), (0, B / 2)]), unaligned);
    }

    #[test]
    fn zero_and_data_mix_like_plain_bytes() {
        for alg in [Algorithm::Blkhash, Algorithm::Sha256, Algorithm::Blake3] {
            let mut a = Hasher::new(alg);
            let mut b = Hasher::new(alg);
            a.update(&[7; 1000]);
            a.zero(3 * B as u64 + 17);
            a.update(&[9; B + 5]);
            b.update(&[7; 1000]);
            b.update(&vec![0; 3 * B + 17]);
            b.update(&[9; B + 5]);
            assert_eq!(a.finalize(), b.finalize(), "{alg:?}");
        }
    }

    #[test]
    fn plain_digests_match_the_usual_tools() {
        // sha256("abc") and blake3("abc") from their specifications' examples.
        let mut s = Hasher::new(Algorithm::Sha256);
        s.update(b"abc");
        assert_eq!(
            s.finalize().hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut b = Hasher::new(Algorithm::Blake3);
        b.update(b"abc");
        assert_eq!(
            b.finalize().hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
