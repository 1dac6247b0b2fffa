//! proptest: random op sequences against `testutil::Model`, reopening in between.

use std::sync::Arc;

use diskimg_blockio::{
    CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage, ZeroFlags,
};
use diskimg_testutil::{Model, pattern, read_all};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Write(u64, usize, u64),
    Zero(u64, usize),
    Discard(u64, usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..5 << 20, 1usize..300_000, any::<u64>()).prop_map(|(o, l, s)| Op::Write(o, l, s)),
        1 => (0u64..5 << 20, 1usize..3_000_000).prop_map(|(o, l)| Op::Zero(o, l)),
        1 => (0u64..5 << 20, 1usize..3_000_000).prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Reopen),
    ]
}

fn run(opts: &str, ops: &[Op]) {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(5 << 20, OptionList::parse(opts).unwrap());
    diskimg_vhd::DRIVER.create(s.clone(), &mut req).unwrap();
    let mut dev = diskimg_vhd::DRIVER
        .open(s.clone(), &OpenOptions::new())
        .unwrap();
    let size = dev.virtual_size();
    let mut m = Model::zeroed(size as usize);
    for op in ops {
        match *op {
            Op::Write(o, l, seed) => {
                let o = o % size;
                let l = (l as u64).min(size - o) as usize;
                let d = pattern(seed, l);
                dev.write_at(&d, o).unwrap();
                m.write(o as usize, &d);
            }
            Op::Zero(o, l) | Op::Discard(o, l) => {
                let o = o % size;
                let l = (l as u64).min(size - o) as usize;
                if matches!(op, Op::Zero(..)) {
                    dev.write_zeroes(o, l as u64, ZeroFlags::default()).unwrap();
                } else {
                    dev.discard(o, l as u64).unwrap();
                }
                m.zero(o as usize, l);
            }
            Op::Reopen => {
                dev.flush().unwrap();
                dev = diskimg_vhd::DRIVER
                    .open(s.clone(), &OpenOptions::new())
                    .unwrap();
            }
        }
    }
    assert!(
        read_all(dev.as_ref()) == m.bytes,
        "content differs from the model"
    );
    let r = dev.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn dynamic_matches_model(ops in proptest::collection::vec(op(), 1..12)) {
        run("", &ops);
    }
    #[test]
    fn fixed_matches_model(ops in proptest::collection::vec(op(), 1..12)) {
        run("subformat=fixed", &ops);
    }
}

#[test]
fn concurrent_writers_and_readers() {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(16 << 20, OptionList::new());
    diskimg_vhd::DRIVER.create(s.clone(), &mut req).unwrap();
    let dev = diskimg_vhd::DRIVER.open(s, &OpenOptions::new()).unwrap();
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let dev = dev.clone();
            sc.spawn(move || {
                for i in 0..16u64 {
                    // Interleaved 256 KiB slices: threads share blocks.
                    let off = (i * 4 + t) * (256 << 10);
                    let d = pattern(t * 100 + i, 256 << 10);
                    dev.write_at(&d, off).unwrap();
                    let mut back = vec![0u8; d.len()];
                    dev.read_at(&mut back, off).unwrap();
                    assert!(back == d);
                }
            });
        }
    });
    for t in 0..4u64 {
        for i in 0..16u64 {
            let off = (i * 4 + t) * (256 << 10);
            let mut back = vec![0u8; 256 << 10];
            dev.read_at(&mut back, off).unwrap();
            assert!(back == pattern(t * 100 + i, 256 << 10));
        }
    }
    assert_eq!(dev.check(Default::default()).unwrap().corruptions, 0);
}
