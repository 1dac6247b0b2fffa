//! UUIDs as VDI stores them, and random (version 4) UUIDs without extra dependencies.
//!
//! VirtualBox stores `RTUUID`s in the little-endian GUID layout: the first three fields
//! (32, 16 and 16 bits) are byte-swapped relative to RFC 4122 text order.
//!
//! Randomness comes from the standard library: every
//! [`std::collections::hash_map::RandomState`] is keyed from the operating system's random
//! source (once per thread, then varied), and diskimg hashes the current time, the
//! process id and a process-wide counter with two of them. That gives unpredictable,
//! non-repeating 122-bit values without a new dependency and without opening files.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A UUID in RFC 4122 byte order (as printed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Uuid(pub [u8; 16]);

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_u64(salt: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u64(salt);
    h.finish()
}

/// Swaps between RFC 4122 order and the little-endian GUID layout (an involution).
fn swap_fields(b: [u8; 16]) -> [u8; 16] {
    let [a0, a1, a2, a3, b0, b1, c0, c1, rest @ ..] = b;
    let mut out = [0u8; 16];
    let head = [a3, a2, a1, a0, b1, b0, c1, c0];
    for (dst, src) in out.iter_mut().zip(head.iter().chain(rest.iter())) {
        *dst = *src;
    }
    out
}

impl Uuid {
    /// A new random (version 4, RFC 4122 variant) UUID.
    pub fn random() -> Uuid {
        let hi = random_u64(0x5644_4931).to_be_bytes();
        let lo = random_u64(0x5644_4932).to_be_bytes();
        let mut b = [0u8; 16];
        for (dst, src) in b.iter_mut().zip(hi.iter().chain(lo.iter())) {
            *dst = *src;
        }
        let [_, _, _, _, _, _, v, _, r, ..] = &mut b;
        *v = (*v & 0x0f) | 0x40;
        *r = (*r & 0x3f) | 0x80;
        Uuid(b)
    }

    /// Decodes the on-disk (little-endian GUID) layout.
    pub fn from_disk(b: [u8; 16]) -> Uuid {
        Uuid(swap_fields(b))
    }

    /// Encodes to the on-disk layout.
    pub fn to_disk(self) -> [u8; 16] {
        swap_fields(self.0)
    }

    /// True for the all-zero UUID.
    pub fn is_nil(self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Display for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_uuids_differ_and_are_v4() {
        let a = Uuid::random();
        let b = Uuid::random();
        assert_ne!(a, b);
        assert_eq!(a.0[6] >> 4, 4);
        assert_eq!(a.0[8] >> 6, 2);
        assert!(!a.is_nil());
        assert_eq!(Uuid::from_disk(a.to_disk()), a);
        let s = a.to_string();
        assert_eq!(s.len(), 36);
    }

    #[test]
    fn disk_layout_swaps_first_fields() {
        let u = Uuid([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        assert_eq!(
            u.to_disk(),
            [4, 3, 2, 1, 6, 5, 8, 7, 9, 10, 11, 12, 13, 14, 15, 16]
        );
    }
}
