//! Tests of `O_DIRECT` alignment and the partial-block cache (`super`).

use std::sync::Arc;

use proptest::prelude::*;

use crate::{CacheMode, FileStorage, MemStorage, Storage};

fn direct_file(dir: &tempfile::TempDir, name: &str) -> FileStorage {
    let p = dir.path().join(name);
    drop(FileStorage::create(&p).unwrap());
    let s = FileStorage::open_with(&p, false, CacheMode::None).unwrap();
    assert!(s.direct_io().is_some());
    s
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, usize, u8, usize),
    Read(u64, usize),
    Zero(u64, u64),
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let off = 0u64..70_000;
    prop_oneof![
        4 => (off.clone(), 1usize..20_000, any::<u8>(), 0usize..64)
            .prop_map(|(o, l, b, skew)| Op::Write(o, l, b, skew)),
        2 => (off.clone(), 1usize..20_000).prop_map(|(o, l)| Op::Read(o, l)),
        1 => (off, 1u64..9000).prop_map(|(o, l)| Op::Zero(o, l)),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Unaligned offsets, lengths and buffers behave as buffered I/O: same bytes, same
    /// file length, same reads past the end.
    #[test]
    fn direct_io_matches_a_model(ops in proptest::collection::vec(op(), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let s = direct_file(&dir, "d");
        let m = MemStorage::new();
        for op in ops {
            match op {
                Op::Write(o, l, b, skew) => {
                    // A buffer starting `skew` bytes into an allocation.
                    let mut v = vec![0u8; l + skew];
                    v[skew..].iter_mut().enumerate().for_each(|(i, x)| *x = b ^ (i as u8));
                    s.write_all_at(&v[skew..], o).unwrap();
                    m.write_all_at(&v[skew..], o).unwrap();
                }
                Op::Read(o, l) => {
                    let (mut a, mut b) = (vec![0u8; l], vec![0u8; l]);
                    let (ra, rb) = (s.read_exact_at(&mut a, o), m.read_exact_at(&mut b, o));
                    prop_assert_eq!(ra.is_ok(), rb.is_ok());
                    if ra.is_ok() {
                        prop_assert_eq!(a, b);
                    }
                }
                Op::Zero(o, l) => {
                    s.write_zeroes(o, l).unwrap();
                    m.write_zeroes(o, l).unwrap();
                }
                Op::Flush => s.flush().unwrap(),
            }
            prop_assert_eq!(s.len().unwrap(), m.len().unwrap());
        }
        let mut all = vec![0u8; m.len().unwrap() as usize];
        s.read_exact_at(&mut all, 0).unwrap();
        prop_assert_eq!(&all, &m.to_vec());
        // Closing writes the cached partial blocks back.
        drop(s);
        prop_assert_eq!(std::fs::read(dir.path().join("d")).unwrap(), all);
    }
}

#[test]
fn concurrent_writes_into_one_block_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(direct_file(&dir, "c"));
    // 8 threads x 64 pieces of 100 bytes, interleaved inside the same blocks.
    std::thread::scope(|sc| {
        for t in 0..8u8 {
            let s = s.clone();
            sc.spawn(move || {
                for k in 0..64u64 {
                    let off = (k * 8 + u64::from(t)) * 100;
                    s.write_all_at(&[t + 1; 100], off).unwrap();
                }
            });
        }
    });
    let mut all = vec![0u8; 8 * 64 * 100];
    s.read_exact_at(&mut all, 0).unwrap();
    for (i, piece) in all.chunks(100).enumerate() {
        assert!(piece.iter().all(|&b| b == (i % 8) as u8 + 1), "piece {i}");
    }
    assert_eq!(s.len().unwrap(), 8 * 64 * 100);
}

/// Small writes into cached blocks (metadata updates) while other threads write whole
/// blocks elsewhere and over the same blocks: every byte ends as the last write to it
/// left it, in the cache and after the flush.
#[test]
fn cached_small_writes_beside_aligned_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(direct_file(&dir, "m"));
    let mut big = super::Aligned::new(64 << 10, 4096);
    let blk = big.get(64 << 10);
    blk.fill(0);
    s.write_all_at(blk, 0).unwrap();
    std::thread::scope(|sc| {
        // Two threads update 8-byte entries of the first 16 KiB (own entries each).
        for t in 0..2u64 {
            let s = s.clone();
            sc.spawn(move || {
                for round in 0..50u8 {
                    for e in 0..64u64 {
                        let off = (e * 2 + t) * 128 + 8;
                        s.write_all_at(&[round.wrapping_add(t as u8); 8], off)
                            .unwrap();
                    }
                }
            });
        }
        // Two threads write whole blocks at 16..64 KiB, 64 times each.
        for t in 0..2u64 {
            let s = s.clone();
            sc.spawn(move || {
                let mut b = super::Aligned::new(24 << 10, 4096);
                let buf = b.get(24 << 10);
                for k in 0..64u8 {
                    buf.fill(k ^ (t as u8 * 0x80));
                    s.write_all_at(buf, (16 << 10) + t * (24 << 10)).unwrap();
                }
            });
        }
    });
    let check = |all: &[u8]| {
        for e in 0..128u64 {
            let off = (e * 128 + 8) as usize;
            assert_eq!(all[off..off + 8], [49 + (e % 2) as u8; 8], "entry {e}");
        }
        assert!(all[16 << 10..40 << 10].iter().all(|&b| b == 63));
        assert!(all[40 << 10..64 << 10].iter().all(|&b| b == 63 ^ 0x80));
    };
    let mut all = vec![0u8; 64 << 10];
    s.read_exact_at(&mut all, 0).unwrap();
    check(&all);
    s.flush().unwrap();
    check(&std::fs::read(dir.path().join("m")).unwrap());
}

/// Cache mode `none` keeps partial blocks until a flush (another open of the file
/// does not see them yet), reads see them at once; `directsync` writes them through.
#[test]
fn partial_blocks_wait_for_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let s = direct_file(&dir, "w");
    s.write_all_at(&[1; 8192], 0).unwrap();
    s.write_all_at(&[2; 2], 4100).unwrap();
    let on_disk = || std::fs::read(dir.path().join("w")).unwrap();
    assert_eq!(on_disk()[4100], 1, "cached, not written yet");
    let mut b = [0u8; 4];
    s.read_exact_at(&mut b, 4099).unwrap();
    assert_eq!(b, [1, 2, 2, 1]);
    // An aligned write over the cached block replaces its bytes in the cache too.
    let mut big = super::Aligned::new(4096, 4096);
    let blk = big.get(4096);
    blk.fill(3);
    s.write_all_at(blk, 4096).unwrap();
    s.write_all_at(&[4; 1], 4097).unwrap();
    s.flush().unwrap();
    let d = on_disk();
    assert_eq!((d[4096], d[4097], d[4100], d[8191]), (3, 4, 3, 3));
    assert!(s.direct_io().unwrap().dirty().is_empty());
    // directsync: through at once.
    let p = dir.path().join("w");
    let sync = FileStorage::open_with(&p, false, CacheMode::DirectSync).unwrap();
    sync.write_all_at(&[5; 3], 10).unwrap();
    assert_eq!(on_disk()[10..13], [5, 5, 5]);
    // Past the last whole block: padded and trimmed at once, as before.
    s.write_all_at(&[6; 10], 8190).unwrap();
    assert_eq!(on_disk().len(), 8200);
}

#[test]
fn aligned_requests_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let s = direct_file(&dir, "a");
    assert_eq!(s.cache_mode(), CacheMode::None);
    assert!(
        s.host_file().is_none(),
        "no copy_file_range around O_DIRECT"
    );
    let d = s.direct_io().unwrap();
    assert!(d.align.is_power_of_two() && d.align <= 4096);
    // Big aligned request from an aligned buffer (no bounce), read back unaligned.
    let mut big = super::Aligned::new(3 << 20, 4096);
    let b = big.get(3 << 20);
    b.iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i % 253) as u8);
    s.write_all_at(b, 1 << 20).unwrap();
    let mut back = vec![0u8; (3 << 20) - 7];
    s.read_exact_at(&mut back, (1 << 20) + 7).unwrap();
    assert_eq!(back[..], b[7..]);
    s.flush().unwrap();
    // Reads past the end fail.
    let mut tail = [0u8; 10];
    assert!(s.read_exact_at(&mut tail, (4 << 20) - 5).is_err());
    // unsafe: flush does nothing (and succeeds); writethrough opens with O_SYNC.
    let p = dir.path().join("a");
    let u = FileStorage::open_with(&p, false, CacheMode::Unsafe).unwrap();
    u.flush().unwrap();
    assert!(u.host_file().is_some());
    let w = FileStorage::open_with(&p, false, CacheMode::Writethrough).unwrap();
    let fl = rustix::fs::fcntl_getfl(w.file()).unwrap();
    assert!(fl.contains(rustix::fs::OFlags::DSYNC));
    let fl = rustix::fs::fcntl_getfl(s.file()).unwrap();
    assert!(fl.contains(rustix::fs::OFlags::DIRECT));
}

/// The same file with the largest alignment (4096, valid on every device) and the
/// probe qemu uses where `statx` says nothing.
#[test]
fn page_alignment_and_probing() {
    let dir = tempfile::tempdir().unwrap();
    let s = direct_file(&dir, "p");
    let probed = super::probe_by_reading(s.file()).unwrap();
    assert!(probed.is_power_of_two() && (512..=4096).contains(&probed));
    let d = super::DirectIo {
        align: 4096,
        mem_align: 4096,
        rmw: std::sync::RwLock::new(()),
        caching: false.into(),
        dirty: std::sync::Mutex::default(),
    };
    let m = MemStorage::new();
    let f = s.file();
    for (i, (off, len)) in [(10u64, 5000usize), (4000, 200), (9000, 1), (100, 12000)]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|k| (k + i * 7) as u8).collect();
        d.write_all(f, &data, off).unwrap();
        m.write_all_at(&data, off).unwrap();
        assert_eq!(f.metadata().unwrap().len(), m.len().unwrap());
    }
    let mut got = vec![0u8; m.len().unwrap() as usize - 3];
    d.read_exact(f, &mut got, 3).unwrap();
    assert_eq!(got[..], m.to_vec()[3..]);
}

#[test]
fn file_systems_without_o_direct_are_refused() {
    // procfs takes no O_DIRECT (as qemu, the open fails: no silent page cache).
    let e = FileStorage::open_with("/proc/self/status", true, CacheMode::None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not support O_DIRECT"), "{e}");
    assert!(FileStorage::open_with("/proc/self/status", true, CacheMode::Writeback).is_ok());
}

/// This thread's read and write syscalls so far (`/proc/thread-self/io`: `syscr`, `syscw`).
fn thread_syscalls() -> (u64, u64) {
    let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    let field = |k: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    (field("syscr:"), field("syscw:"))
}

/// A vectored request of many 4 KiB buffers (a guest's 1 MiB request) is one device
/// request with `O_DIRECT`, not one per buffer, and moves the same bytes.
#[test]
fn vectored_requests_are_one_request_each() {
    let dir = tempfile::tempdir().unwrap();
    let s = direct_file(&dir, "v.img");
    let pages: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 4096]).collect();
    let slices: Vec<std::io::IoSlice<'_>> =
        pages.iter().map(|p| std::io::IoSlice::new(p)).collect();
    let before = thread_syscalls();
    s.write_vectored_all_at(&slices, 8192).unwrap();
    let mut back: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 4096]).collect();
    let mut outs: Vec<std::io::IoSliceMut<'_>> = back
        .iter_mut()
        .map(|b| std::io::IoSliceMut::new(b))
        .collect();
    s.read_vectored_exact_at(&mut outs, 8192).unwrap();
    let after = thread_syscalls();
    // One request each way, plus the reads of /proc itself.
    assert!(after.1 - before.1 <= 4, "{before:?} {after:?}");
    assert!(after.0 - before.0 <= 6, "{before:?} {after:?}");
    assert_eq!(back, pages);
    let mut plain = vec![0u8; 64 * 4096];
    s.read_exact_at(&mut plain, 8192).unwrap();
    assert!(
        plain
            .chunks(4096)
            .zip(&pages)
            .all(|(a, b)| a == b.as_slice())
    );
    // Odd lengths and an unaligned offset go through the same path.
    let odd: Vec<Vec<u8>> = vec![vec![7; 100], vec![8; 5000], vec![9; 3]];
    let slices: Vec<std::io::IoSlice<'_>> = odd.iter().map(|p| std::io::IoSlice::new(p)).collect();
    s.write_vectored_all_at(&slices, 12_345).unwrap();
    let mut got = vec![0u8; 5103];
    s.read_exact_at(&mut got, 12_345).unwrap();
    assert_eq!(got, odd.concat());
}

#[test]
fn aligned_vectored_reads_go_straight_into_the_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let s = direct_file(&dir, "a.img");
    let pages: Vec<u8> = (0..64u32 * 4096)
        .map(|i| (i / 4096 * 7 + i % 251) as u8)
        .collect();
    s.write_all_at(&pages, 4096).unwrap();
    // A few bytes inside the range wait in the partial-block cache (cache mode none):
    // the read must still see them.
    s.write_all_at(&[0xee; 5], 4096 + 3 * 4096 + 100).unwrap();
    let mut want = pages.clone();
    want[3 * 4096 + 100..3 * 4096 + 105].fill(0xee);
    // 64 page-aligned buffers, as a guest's pages, in scattered order.
    let mut mem = super::Aligned::new(128 * 4096, 4096);
    let mem = mem.get(128 * 4096);
    let mut chunks: Vec<&mut [u8]> = mem.chunks_mut(4096).collect();
    chunks.reverse();
    let mut outs: Vec<std::io::IoSliceMut<'_>> = chunks
        .into_iter()
        .step_by(2)
        .map(std::io::IoSliceMut::new)
        .collect();
    let d = s.direct_io().unwrap();
    assert!(matches!(
        d.read_aligned(s.file(), &mut outs, 4096),
        Some(Ok(()))
    ));
    let got: Vec<u8> = outs.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(got, want);
    for b in &mut outs {
        b.fill(0);
    }
    s.read_vectored_exact_at(&mut outs, 4096).unwrap();
    let got: Vec<u8> = outs.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(got, want);
    // Past the end of the file the read comes up short: left to the bounce path,
    // which fails as before.
    assert!(d.read_aligned(s.file(), &mut outs, 65 * 4096).is_none());
    assert!(s.read_vectored_exact_at(&mut outs, 65 * 4096).is_err());
    // A buffer off its alignment, or an unaligned offset: not this path.
    assert!(d.read_aligned(s.file(), &mut outs, 4096 + 512).is_none());
    let mut odd = vec![0u8; 4096 + 1];
    let mut two = [
        std::io::IoSliceMut::new(&mut odd[1..]),
        std::io::IoSliceMut::new(&mut []),
    ];
    assert!(d.read_aligned(s.file(), &mut two, 4096).is_none());
}

#[test]
fn aligned_vectored_writes_go_straight_from_the_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let s = direct_file(&dir, "w.img");
    s.write_all_at(&vec![0x11; 80 * 4096], 0).unwrap();
    // A few bytes wait in the partial-block cache (cache mode none) inside the range the
    // vectored write covers: the write must replace them, not be undone by them.
    s.write_all_at(&[0xee; 5], 4096 + 2 * 4096 + 100).unwrap();
    // 64 page-aligned buffers, as a guest's pages, in scattered order.
    let mut mem = super::Aligned::new(128 * 4096, 4096);
    let mem = mem.get(128 * 4096);
    for (i, page) in mem.chunks_mut(4096).enumerate() {
        page.fill(i as u8);
    }
    let mut chunks: Vec<&[u8]> = mem.chunks(4096).collect();
    chunks.reverse();
    let ins: Vec<std::io::IoSlice<'_>> = chunks
        .into_iter()
        .step_by(2)
        .map(std::io::IoSlice::new)
        .collect();
    let want: Vec<u8> = ins.iter().flat_map(|b| b.iter().copied()).collect();
    let d = s.direct_io().unwrap();
    assert!(matches!(
        d.write_aligned_vectored(s.file(), &ins, 4096),
        Some(Ok(()))
    ));
    let mut got = vec![0u8; 64 * 4096];
    s.read_exact_at(&mut got, 4096).unwrap();
    assert_eq!(got, want);
    // After a flush (the cached block written back) the file still holds the write.
    s.flush().unwrap();
    let mut raw = vec![0u8; 66 * 4096];
    std::fs::File::open(dir.path().join("w.img"))
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut raw, 0))
        .unwrap();
    assert!(raw[..4096].iter().all(|&b| b == 0x11));
    assert_eq!(&raw[4096..65 * 4096], &want[..]);
    assert!(raw[65 * 4096..].iter().all(|&b| b == 0x11));
    // Through the storage's own vectored write too.
    s.write_vectored_all_at(&ins[..8], 70 * 4096).unwrap();
    let mut back = vec![0u8; 8 * 4096];
    s.read_exact_at(&mut back, 70 * 4096).unwrap();
    assert_eq!(back, want[..8 * 4096]);
    // A buffer off its alignment, or an unaligned offset: not this path.
    assert!(d.write_aligned_vectored(s.file(), &ins, 4096 + 1).is_none());
    let odd = vec![0u8; 4096 + 1];
    let two = [std::io::IoSlice::new(&odd[1..]), std::io::IoSlice::new(&[])];
    assert!(d.write_aligned_vectored(s.file(), &two, 4096).is_none());
}

/// A plain read straight from the file is offered only where it returns what
/// `read_exact_at` does: aligned with `O_DIRECT`, and not over a cached partial block.
#[test]
fn plain_reads_only_where_the_file_holds_the_bytes() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let s = direct_file(&dir, "p");
    let d = s.direct_io().unwrap();
    let align = d.align as u64;
    s.set_len(4 * align).unwrap();
    s.flush().unwrap();
    let p = s.plain_read(0, 2 * align).expect("aligned, nothing cached");
    assert_eq!(p.fd.as_raw_fd(), s.file().as_raw_fd());
    assert_eq!((p.mem_align, p.len_align), (d.mem_align, d.align));
    assert!(p.fits(0, d.align) && !p.fits(1, d.align) && !p.fits(0, d.align + 1));
    if align > 1 {
        assert!(s.plain_read(1, align).is_none(), "unaligned offset");
        assert!(s.plain_read(0, align + 1).is_none(), "unaligned length");
        // A partial write of block 1 stays in memory until the flush (cache mode none):
        // the file does not hold it yet.
        s.write_all_at(&[9], align + 3).unwrap();
        assert!(s.plain_read(align, align).is_none());
        assert!(s.plain_read(0, 2 * align).is_none());
        assert!(
            s.plain_read(2 * align, align).is_some(),
            "other blocks still are"
        );
        s.flush().unwrap();
        assert!(s.plain_read(0, 2 * align).is_some());
    }
    // Wrappers that pass bytes on unchanged forward it; the page cache needs no alignment.
    let ro = crate::ReadOnlyStorage(s);
    assert!(ro.plain_read(0, align).is_some());
    let b = FileStorage::open(dir.path().join("p"), true).unwrap();
    let p = b.plain_read(1, 3).unwrap();
    assert_eq!((p.mem_align, p.len_align), (1, 1));
    // A storage that is not a host file has none.
    assert!(MemStorage::new().plain_read(0, 512).is_none());
}
