//! proptest: random operation sequences against a `Model`, reopened in between.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage, ZeroFlags,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{Model, read_all};
use proptest::prelude::*;

const SIZE: u64 = 512 << 10;

/// One operation of a random sequence.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    op_in(SIZE, 70_000)
}

/// Operations on a disk of `size` bytes, each at most `max_len` bytes long.
pub(crate) fn op_in(size: u64, max_len: u64) -> impl Strategy<Value = Op> {
    let range = (0..size).prop_flat_map(move |o| (Just(o), 1..=(size - o).min(max_len)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((o, l), b)| Op::Write(o, l, b)),
        1 => (range.clone(), any::<bool>()).prop_map(|((o, l), u)| Op::Zero(o, l, u)),
        1 => range.prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Reopen),
    ]
}

fn run(options: &str, ops: &[Op]) {
    run_with(options, ops, OpenOptions::new());
}

/// Like [`run`], opening with `oo` (e.g. tiny cache limits).
fn run_with(options: &str, ops: &[Op], oo: OpenOptions) {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse(options).unwrap());
    DRIVER.create(s.clone(), &mut req).unwrap();
    let dev = apply(ops, SIZE, &|| DRIVER.open(s.clone(), &oo).unwrap());
    let r = dev.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
}

/// Applies `ops` to a device from `open` (reopened on [`Op::Reopen`]) and to a [`Model`]
/// of a `size`-byte disk, asserts they read the same, and returns the last device.
pub(crate) fn apply(
    ops: &[Op],
    size: u64,
    open: &dyn Fn() -> Arc<dyn BlockDevice>,
) -> Arc<dyn BlockDevice> {
    let mut dev = open();
    let mut m = Model::zeroed(size as usize);
    for op in ops {
        match *op {
            Op::Write(o, l, b) => {
                // Varying bytes, so that data landing in the wrong sector shows.
                let d: Vec<u8> = (0..l).map(|i| b.wrapping_add(i as u8)).collect();
                dev.write_at(&d, o).unwrap();
                m.write(o as usize, &d);
            }
            Op::Zero(o, l, u) => {
                dev.write_zeroes(o, l, ZeroFlags { may_unmap: u }).unwrap();
                m.zero(o as usize, l as usize);
            }
            Op::Discard(o, l) => {
                // Without a backing file, discarded clusters read as zeroes; partial
                // clusters are left alone.
                dev.discard(o, l).unwrap();
                let cs = dev.info().cluster_size.unwrap();
                let start = o.div_ceil(cs) * cs;
                let end = if o + l == size {
                    size
                } else {
                    (o + l) / cs * cs
                };
                if start < end {
                    m.zero(start as usize, (end - start) as usize);
                }
            }
            Op::Reopen => {
                dev.flush().unwrap();
                drop(dev);
                dev = open();
            }
        }
    }
    assert!(
        read_all(dev.as_ref()) == m.bytes,
        "content differs from the model"
    );
    dev
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn model_v3_4k(ops in proptest::collection::vec(op(), 1..25)) {
        run("cluster_size=4k", &ops);
    }
    #[test]
    fn model_v2_512(ops in proptest::collection::vec(op(), 1..25)) {
        run("compat=0.10,cluster_size=512", &ops);
    }
    #[test]
    fn model_tiny_cache(ops in proptest::collection::vec(op(), 1..25)) {
        // Two cached L2 tables of 512 bytes: constant eviction and deferred-update commits.
        let mut limits = diskimg_blockio::Limits::default();
        limits.max_cache_bytes = 1024;
        run_with("cluster_size=512,refcount_bits=8", &ops, OpenOptions::new().limits(limits));
    }
    #[test]
    fn model_extended_l2(ops in proptest::collection::vec(op(), 1..25)) {
        run("extended_l2=on,cluster_size=32k,refcount_bits=1", &ops);
    }
}
