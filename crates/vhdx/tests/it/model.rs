//! proptest: random operation sequences against `testutil::Model`, reopening between
//! rounds (dynamic, fixed and differencing images).

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OptionList, Storage, ZeroFlags,
};
use diskimg_testutil::{Model, read_all};
use proptest::prelude::*;

const SIZE: u64 = 6 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write(u64, usize, u8),
    Zero(u64, usize),
    Discard(u64, usize),
    Flush,
    Reopen,
    Grow(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let range =
        (0..SIZE).prop_flat_map(|off| (Just(off), 1..=((SIZE - off).min(3 << 20) as usize)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((o, l), b)| Op::Write(o, l.min(300_000), b)),
        2 => range.clone().prop_map(|(o, l)| Op::Zero(o, l)),
        1 => range.prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => (1u64..8192).prop_map(|n| Op::Grow(n * 512)),
    ]
}

fn open(s: &Arc<MemStorage>, parent: &Option<Arc<dyn BlockDevice>>) -> Arc<dyn BlockDevice> {
    let st: Arc<dyn Storage> = s.clone();
    let dev = diskimg_vhdx::DRIVER
        .open(st, &crate::common::unlinked())
        .unwrap();
    dev.set_backing(parent.clone()).unwrap();
    dev
}

fn run(opts: &str, parent_fill: Option<u8>, ops: &[Op]) {
    let s = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(SIZE, OptionList::parse(opts).unwrap());
    diskimg_vhdx::DRIVER.create(s.clone(), &mut req).unwrap();
    let parent: Option<Arc<dyn BlockDevice>> = parent_fill.map(|b| {
        let ps = Arc::new(MemStorage::new());
        let mut req = CreateRequest::new(SIZE, OptionList::parse("block_size=1M").unwrap());
        diskimg_vhdx::DRIVER.create(ps.clone(), &mut req).unwrap();
        let p = open(&ps, &None);
        p.write_at(&vec![b; SIZE as usize], 0).unwrap();
        p
    });
    let mut model = Model::zeroed(SIZE as usize);
    if let Some(b) = parent_fill {
        model.bytes.fill(b);
    }
    let mut dev = open(&s, &parent);
    for op in ops {
        match *op {
            Op::Write(o, l, b) => {
                let data: Vec<u8> = (0..l).map(|i| b ^ (i as u8)).collect();
                dev.write_at(&data, o).unwrap();
                model.write(o as usize, &data);
            }
            Op::Zero(o, l) => {
                dev.write_zeroes(o, l as u64, ZeroFlags::default()).unwrap();
                model.zero(o as usize, l);
            }
            // Discard is ignored, as by qemu's vhdx driver: the model is unchanged.
            Op::Discard(o, l) => dev.discard(o, l as u64).unwrap(),
            Op::Flush => dev.flush().unwrap(),
            Op::Grow(n) => {
                let new = dev.virtual_size() + n;
                dev.resize(new, diskimg_blockio::Preallocation::Off, false)
                    .unwrap();
                model.bytes.resize(new as usize, 0);
            }
            Op::Reopen => {
                drop(dev);
                dev = open(&s, &parent);
            }
        }
    }
    assert!(
        read_all(dev.as_ref()) == model.bytes,
        "content differs from the model"
    );
    drop(dev);
    let dev = open(&s, &parent);
    assert!(
        read_all(dev.as_ref()) == model.bytes,
        "content differs after reopen"
    );
    let r = dev.check(diskimg_blockio::RepairMode::None).unwrap();
    assert_eq!(r.corruptions, 0, "{r:?}");
}

/// 16 cases by default (fast CI); `PROPTEST_CASES` raises it.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn dynamic_matches_model(ops in proptest::collection::vec(op(), 1..24)) {
        run("block_size=1M", None, &ops);
    }

    #[test]
    fn fixed_matches_model(ops in proptest::collection::vec(op(), 1..16)) {
        run("subformat=fixed,block_size=1M", None, &ops);
    }

    #[test]
    fn differencing_matches_model(ops in proptest::collection::vec(op(), 1..24)) {
        run("block_size=1M,backing_file=p.vhdx", Some(0x77), &ops);
    }
}
