//! Random operation sequences against the in-memory model, reopening in between.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Preallocation,
    RepairMode, Storage, ZeroFlags,
};
use diskimg_testutil::{Model, read_all};
use proptest::prelude::*;

const SIZE: u64 = 6 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Reopen,
    Grow { extra: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIZE, 1usize..300_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        2 => (0..SIZE, 1u64..2_500_000).prop_map(|(off, len)| Op::Zero { off, len }),
        1 => (0..SIZE, 1u64..2_500_000).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Reopen),
        1 => (0u64..3_000_000).prop_map(|extra| Op::Grow { extra }),
    ]
}

fn open(s: &Arc<MemStorage>) -> Arc<dyn BlockDevice> {
    let st: Arc<dyn Storage> = s.clone();
    diskimg_vdi::DRIVER.open(st, &OpenOptions::new()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn model_agrees(is_static in any::<bool>(), ops in prop::collection::vec(op(), 1..24)) {
        let s = Arc::new(MemStorage::new());
        let st: Arc<dyn Storage> = s.clone();
        let opts = if is_static { "static=on" } else { "" };
        let mut req = CreateRequest::new(SIZE, OptionList::parse(opts).unwrap());
        diskimg_vdi::DRIVER.create(st, &mut req).unwrap();
        let mut dev = open(&s);
        let mut model = Model::zeroed(SIZE as usize);
        for op in ops {
            let size = dev.virtual_size();
            match op {
                Op::Write { off, len, seed } => {
                    let off = off % size;
                    let len = len.min((size - off) as usize);
                    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect();
                    dev.write_at(&data, off).unwrap();
                    model.write(off as usize, &data);
                }
                Op::Zero { off, len } => {
                    let off = off % size;
                    let len = len.min(size - off);
                    dev.write_zeroes(off, len, ZeroFlags { may_unmap: true }).unwrap();
                    model.zero(off as usize, len as usize);
                }
                Op::Discard { off, len } => {
                    let off = off % size;
                    dev.discard(off, len.min(size - off)).unwrap();
                }
                Op::Reopen => {
                    dev.flush().unwrap();
                    dev = open(&s);
                }
                Op::Grow { extra } => {
                    let new = size + extra;
                    dev.resize(new, Preallocation::Off, false).unwrap();
                    let new = dev.virtual_size();
                    prop_assert_eq!(new, new.div_ceil(512) * 512);
                    model.bytes.resize(new as usize, 0);
                }
            }
            prop_assert_eq!(dev.check(RepairMode::None).unwrap().corruptions, 0);
        }
        prop_assert!(read_all(dev.as_ref()) == model.bytes);
        dev.flush().unwrap();
        let dev = open(&s);
        prop_assert!(read_all(dev.as_ref()) == model.bytes);
        prop_assert_eq!(dev.check(RepairMode::None).unwrap().corruptions, 0);
    }
}
