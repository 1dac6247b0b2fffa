//! Truncations at structure boundaries and a mutator for bit-flip / field mutants, aimed
//! at the bytes that matter (the sectors of the image that are not all zero, the first
//! 4 KiB half of the time), driven by `(position, kind, value)` triples that a proptest
//! strategy (or a seed) provides. A mutant is a [`Patched`] storage: the shared base
//! plus a few patches, so no image is copied per mutant.

use std::sync::Arc;

use diskimg_blockio::{Error, Result, Storage};

/// Lengths to truncate `image` to: every 512 bytes in the first 64 KiB, every 4 KiB up
/// to 1 MiB, every 64 KiB after, and one byte short of each non-zero sector's end.
pub fn truncations(image: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut len = 0;
    while len < image.len() {
        out.push(len);
        len += if len < 64 << 10 {
            512
        } else if len < 1 << 20 {
            4096
        } else {
            64 << 10
        };
    }
    for (i, s) in image.chunks(512).enumerate() {
        if s.iter().any(|&b| b != 0) {
            out.push(i * 512 + s.len() - 1);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Interesting values for overwritten fields.
const VALUES: [u64; 10] = [
    0,
    1,
    0x7f,
    0x200,
    0x1_0000,
    0xffff_ffff,
    0x8000_0000,
    1 << 40,
    u64::MAX,
    u64::MAX - 511,
];

/// Makes mutants of one base image.
#[derive(Clone, Debug)]
pub struct Mutator {
    base: Arc<Vec<u8>>,
    /// Offsets of the sectors worth mutating (not all zero).
    hot: Vec<usize>,
}

impl Mutator {
    /// A mutator for `base`.
    pub fn new(base: Vec<u8>) -> Self {
        let mut hot: Vec<usize> = base
            .chunks(512)
            .enumerate()
            .filter(|(_, s)| s.iter().any(|&b| b != 0))
            .map(|(i, _)| i * 512)
            .collect();
        if hot.is_empty() {
            hot.push(0);
        }
        Self {
            base: Arc::new(base),
            hot,
        }
    }

    /// A mutant: each `(pos, kind, value)` picks a byte (in the first 4 KiB when `pos` is
    /// even, else in a hot sector), then flips a bit there (kind 0), sets the byte (1),
    /// writes an interesting 32-bit (2) or 64-bit (3) value in either byte order, or cuts
    /// the image there (4).
    pub fn mutant(&self, muts: &[(u32, u8, u64)]) -> Patched {
        let mut m = Patched {
            base: self.base.clone(),
            len: self.base.len(),
            patches: Vec::new(),
        };
        for &(pos, kind, value) in muts {
            let p = (pos >> 1) as usize;
            let at = if pos & 1 == 0 {
                p % 4096
            } else {
                self.hot[(p >> 9) % self.hot.len()] + (p & 511)
            };
            if at >= m.len {
                continue;
            }
            let x = if value & 0x80 == 0 {
                VALUES[(value % VALUES.len() as u64) as usize]
            } else {
                value >> 8
            };
            let big = value & 0x100 != 0;
            let bytes = match kind % 5 {
                0 => vec![m.byte(at) ^ (1 << (value % 8))],
                1 => vec![value as u8],
                2 if big => (x as u32).to_be_bytes().to_vec(),
                2 => (x as u32).to_le_bytes().to_vec(),
                3 if big => x.to_be_bytes().to_vec(),
                3 => x.to_le_bytes().to_vec(),
                _ => {
                    m.len = at;
                    continue;
                }
            };
            m.patches.push((at, bytes));
        }
        m
    }

    /// The base cut to `len` bytes.
    pub fn truncated(&self, len: usize) -> Patched {
        Patched {
            base: self.base.clone(),
            len: len.min(self.base.len()),
            patches: Vec::new(),
        }
    }

    /// A mutant from a seed (1–6 mutations), for loops without proptest.
    pub fn seeded(&self, seed: u64) -> Patched {
        let r = crate::pattern(seed, 8 * 19);
        let word = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
        let n = 1 + (word(0) % 6) as usize;
        let muts: Vec<(u32, u8, u64)> = (0..n)
            .map(|i| {
                let (p, k, v) = (word(1 + 3 * i), word(2 + 3 * i), word(3 + 3 * i));
                (p as u32, (k % 5) as u8, v)
            })
            .collect();
        self.mutant(&muts)
    }
}

/// A mutant image: a shared base, patches applied in order, and a length. Read-only.
#[derive(Clone, Debug)]
pub struct Patched {
    base: Arc<Vec<u8>>,
    len: usize,
    patches: Vec<(usize, Vec<u8>)>,
}

impl Patched {
    /// Recomputes the checksums a format guards its headers with (VHD footer and
    /// dynamic header, VHDX headers and region tables) so mutations reach past them.
    pub fn fix_checksums(&mut self, format: &str) {
        let spots: &[(usize, usize, usize, bool)] = match format {
            "vpc" => &[(0, 512, 64, true), (512, 1024, 36, true)],
            "vhdx" => &[
                (64 << 10, 4096, 4, false),
                (128 << 10, 4096, 4, false),
                (192 << 10, 64 << 10, 4, false),
                (256 << 10, 64 << 10, 4, false),
            ],
            _ => &[],
        };
        let mut spots = spots.to_vec();
        if format == "vpc" && self.len >= 1024 {
            spots.push((self.len - 512, 512, 64, true));
        }
        for (start, len, field, vhd) in spots {
            if start + len > self.len {
                continue;
            }
            let mut b = vec![0u8; len];
            self.fill(&mut b, start);
            b[field..field + 4].fill(0);
            let sum = if vhd {
                (!b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)))).to_be_bytes()
            } else {
                super::vhd::crc32c(&b).to_le_bytes()
            };
            self.patches.push((start + field, sum.to_vec()));
        }
    }

    fn byte(&self, at: usize) -> u8 {
        let mut b = [0u8];
        self.fill(&mut b, at);
        b[0]
    }

    /// Copies the mutant's bytes at `off` into `buf` (within the length).
    fn fill(&self, buf: &mut [u8], off: usize) {
        buf.copy_from_slice(&self.base[off..off + buf.len()]);
        for (at, p) in &self.patches {
            let (s, e) = ((*at).max(off), (at + p.len()).min(off + buf.len()));
            if s < e {
                buf[s - off..e - off].copy_from_slice(&p[s - at..e - at]);
            }
        }
    }

    /// The whole mutant as bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.fill(&mut v, 0);
        v
    }
}

impl Storage for Patched {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let off = usize::try_from(offset).map_err(|_| Error::invalid("offset"))?;
        if off.checked_add(buf.len()).is_none_or(|e| e > self.len) {
            return Err(Error::io(
                "read past the end",
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        self.fill(buf, off);
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.len as u64)
    }
    diskimg_blockio::read_only_storage!();
}
