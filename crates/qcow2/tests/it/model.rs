//! proptest: random operation sequences against a `Model`, reopened in between.

use std::sync::Arc;

use diskimg_blockio::{
    CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage, ZeroFlags,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{Model, read_all};
use proptest::prelude::*;

const SIZE: u64 = 512 << 10;

#[derive(Clone, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(70_000)));
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
    let mut dev = DRIVER.open(s.clone(), &oo).unwrap();
    let mut m = Model::zeroed(SIZE as usize);
    for op in ops {
        match *op {
            Op::Write(o, l, b) => {
                dev.write_at(&vec![b; l as usize], o).unwrap();
                m.write(o as usize, &vec![b; l as usize]);
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
                let end = if o + l == SIZE {
                    SIZE
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
                dev = DRIVER.open(s.clone(), &oo).unwrap();
            }
        }
    }
    assert!(
        read_all(dev.as_ref()) == m.bytes,
        "content differs from the model"
    );
    let r = dev.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
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
