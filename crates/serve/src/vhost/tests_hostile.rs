//! Hostile requests: descriptor chains a broken or malicious driver could post (lengths up
//! to 4 GiB, buffers outside guest memory, across memory regions or over the queue's own
//! rings, indirect tables, headers naming any type and sector, discard segments of any
//! size), executed whole ([`process`]) and as split pieces ([`Split`]) against a small
//! export. Nothing may panic, a completion never claims more bytes than the chain lets
//! the device write, and a split request completes exactly once. Deterministic
//! (a fixed xorshift seed), 20000 chains, well under a second.

// Random numbers are cut to the field widths on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;

use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList};
use diskimg_testutil::Rng;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::process;
use super::split::Split;
use crate::export::{Discard, Export, ExportOptions};

/// Guest memory: 1 MiB, a 64 KiB region right after it (descriptors may cross into it),
/// and a 64 KiB region past a gap.
pub(super) const REGIONS: [(u64, usize); 3] =
    [(0, 0x10_0000), (0x10_0000, 0x1_0000), (0x20_0000, 0x1_0000)];
/// The exported image's size.
pub(super) const SIZE: u64 = 256 << 10;

/// One of `items`, chosen by `r`.
pub(super) fn pick<T: Copy, const N: usize>(r: &mut Rng, items: [T; N]) -> T {
    items[r.below(N as u64) as usize]
}

fn export(read_only: bool, unmap: bool) -> Export {
    let s: Arc<dyn diskimg_blockio::Storage> = Arc::new(MemStorage::new());
    let req = &mut CreateRequest::new(SIZE, OptionList::new());
    diskimg_raw::DRIVER.create(s.clone(), req).unwrap();
    let dev = diskimg_raw::DRIVER.open(s, &OpenOptions::new()).unwrap();
    let mut o = ExportOptions::named("h");
    o.read_only = read_only;
    if unmap {
        o.policy.discard = Discard::Unmap;
    }
    Export::new(dev, o)
}

/// A buffer address: usually in the first region past the rings, sometimes over the
/// rings, at a region's end, in the far region or outside memory.
pub(super) fn addr(r: &mut Rng) -> u64 {
    match r.below(8) {
        0 => r.below(0x400),
        1 => 0x10_0000 - r.below(0x2000),
        2 => 0x20_0000 + r.below(0x1_0000),
        3 => {
            let far = u64::MAX - r.below(0x1000);
            pick(r, [0x18_0000, 0x3000_0000, far])
        }
        _ => 0x1_0000 + r.below(0xe_0000),
    }
}

pub(super) fn len(r: &mut Rng) -> u32 {
    match r.below(6) {
        0 => pick(r, [0, 1, 15, 16, 17, 512]),
        1 => pick(r, [u32::MAX, 0x10_0000, 0x8000_0000]),
        _ => r.below(0x1_2000) as u32,
    }
}

/// A request header (type, sector) and discard/write-zeroes segments at `at`.
fn request_bytes(mem: &GuestMemoryMmap, r: &mut Rng, at: u64) {
    let any = r.next_u64() as u32;
    let ty = pick(r, [0u32, 1, 4, 8, 11, 13, 0, 1, any]);
    let sector = match r.below(4) {
        0 => pick(r, [0, SIZE / 512 - 1, SIZE / 512, u64::MAX / 512, u64::MAX]),
        _ => r.below(SIZE / 512),
    };
    let mut b = vec![0u8; 16 + 16 * 34];
    b[..4].copy_from_slice(&ty.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    for seg in b[16..].chunks_exact_mut(16) {
        let s = match r.below(3) {
            0 => r.next_u64(),
            _ => r.below(SIZE / 512),
        };
        seg[..8].copy_from_slice(&s.to_le_bytes());
        let small = r.below(64) as u32;
        let n = pick(r, [0u32, 1, 8, u32::MAX, small]);
        seg[8..12].copy_from_slice(&n.to_le_bytes());
        seg[12..].copy_from_slice(&(r.below(3) as u32).to_le_bytes());
    }
    let _ = mem.write_slice(&b, GuestAddress(at));
}

/// A random chain of 1 to 8 descriptors, the first a header buffer holding a request.
pub(super) fn chain(mem: &GuestMemoryMmap, r: &mut Rng) -> Vec<RawDescriptor> {
    let n = 1 + r.below(8) as usize;
    let head_at = 0x1_0000 + r.below(0xe_0000);
    request_bytes(mem, r, head_at);
    let mut descs = Vec::new();
    for i in 0..n {
        let (a, l) = match i {
            0 if r.below(4) != 0 => {
                let other = len(r);
                (head_at, pick(r, [16, 16, 16 + 16 * 33, 8, other]))
            }
            _ => (addr(r), len(r)),
        };
        let mut flags = if i > 0 && r.below(2) == 0 { 2 } else { 0 };
        if r.below(40) == 0 {
            flags |= 4; // VRING_DESC_F_INDIRECT
        }
        descs.push(RawDescriptor::from(SplitDescriptor::new(a, l, flags, 0)));
    }
    descs
}

/// Bytes the device may write through `descs` (driver-writable lengths), saturating.
pub(super) fn writable_bytes(descs: &[RawDescriptor]) -> u64 {
    descs
        .iter()
        .map(|d| SplitDescriptor::from(*d))
        .filter(|d| d.flags() & 2 != 0)
        .fold(0u64, |n, d| n.saturating_add(u64::from(d.len())))
}

#[test]
fn hostile_chains_complete_without_panics() {
    let mem = GuestMemoryMmap::from_ranges(&REGIONS.map(|(a, n)| (GuestAddress(a), n))).unwrap();
    let exports = [
        export(false, true),
        export(false, false),
        export(true, false),
    ];
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..20_000 {
        let descs = chain(&mem, &mut r);
        let export = &exports[round % exports.len()];
        let q = MockSplitQueue::new(&mem, 16);
        let Ok(c) = q.build_desc_chain(&descs) else {
            continue;
        };
        let (_, used) = process(export, c);
        let indirect = descs
            .iter()
            .any(|d| SplitDescriptor::from(*d).flags() & 4 != 0);
        if !indirect {
            assert!(
                u64::from(used) <= writable_bytes(&descs),
                "{descs:?}: used {used}"
            );
        }
        // A fresh queue: the requests may have written over the rings.
        let q = MockSplitQueue::new(&mem, 16);
        let Ok(c) = q.build_desc_chain(&descs) else {
            continue;
        };
        if let Some(split) = Split::plan(export, &c, 4096, 4) {
            let done: Vec<_> = (0..split.pieces())
                .filter_map(|i| split.run(export, i))
                .collect();
            assert_eq!(done.len(), 1, "{descs:?}");
            if !indirect {
                assert!(u64::from(done[0].1) <= writable_bytes(&descs), "{descs:?}");
            }
        }
    }
}
