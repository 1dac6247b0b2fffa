//! proptest: random operation sequences against the byte-vector model, reopening between.

use std::sync::Arc;

use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage};
use diskimg_testutil::{Model, read_all};
use proptest::prelude::*;

const SIZE: usize = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write(usize, usize, u8),
    Zero(usize, usize),
    Discard(usize, usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(150_000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((o, l), b)| Op::Write(o, l, b)),
        2 => range.clone().prop_map(|(o, l)| Op::Zero(o, l)),
        1 => range.prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn matches_model(zeroed in any::<bool>(), ops in proptest::collection::vec(op(), 1..25)) {
        let s = Arc::new(MemStorage::new());
        let opts = if zeroed { "zeroed_grain=on" } else { "" };
        let mut req = CreateRequest::new(SIZE as u64, OptionList::parse(opts).unwrap()).image_name("m.vmdk");
        diskimg_vmdk::DRIVER.create(s.clone(), &mut req).unwrap();
        let storage: Arc<dyn Storage> = s.clone();
        let mut dev = diskimg_vmdk::DRIVER.open(storage.clone(), &OpenOptions::new()).unwrap();
        let mut model = Model::zeroed(SIZE);
        for op in ops {
            match op {
                Op::Write(o, l, b) => {
                    let data = vec![b; l];
                    dev.write_at(&data, o as u64).unwrap();
                    model.write(o, &data);
                }
                Op::Zero(o, l) => {
                    dev.write_zeroes(o as u64, l as u64, Default::default()).unwrap();
                    model.zero(o, l);
                }
                Op::Discard(o, l) => {
                    // vmdk has no discard (as in qemu): content is kept.
                    dev.discard(o as u64, l as u64).unwrap();
                }
                Op::Reopen => {
                    dev.flush().unwrap();
                    dev = diskimg_vmdk::DRIVER.open(storage.clone(), &OpenOptions::new()).unwrap();
                }
            }
        }
        prop_assert!(read_all(dev.as_ref()) == model.bytes);
        let r = dev.check(diskimg_blockio::RepairMode::None).unwrap();
        prop_assert_eq!(r.corruptions, 0);
    }
}
