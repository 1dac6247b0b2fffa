//! A proptest model test and a crash test for raw devices.

use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, Driver, FaultStorage, MemStorage, OpenOptions, Storage, ZeroFlags,
};
use diskimg_testutil::{Model, read_all};
use proptest::prelude::*;

const SIZE: usize = 256 * 1024;

#[derive(Clone, Debug)]
enum Op {
    Write(usize, usize, u8),
    Zero(usize, usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..SIZE, 1..20_000usize, any::<u8>()).prop_map(|(o, l, b)| Op::Write(o, l, b)),
        (0..SIZE, 1..40_000usize).prop_map(|(o, l)| Op::Zero(o, l)),
        Just(Op::Reopen),
    ]
}

fn open(s: &Arc<MemStorage>) -> Arc<dyn BlockDevice> {
    diskimg_raw::DRIVER
        .open(s.clone(), &OpenOptions::new())
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn raw_matches_model(ops in proptest::collection::vec(op(), 1..30)) {
        let s = Arc::new(MemStorage::from_vec(vec![0; SIZE]));
        let mut dev = open(&s);
        let mut model = Model::zeroed(SIZE);
        for op in ops {
            match op {
                Op::Write(o, l, b) => {
                    let l = l.min(SIZE - o);
                    dev.write_at(&vec![b; l], o as u64).unwrap();
                    model.write(o, &vec![b; l]);
                }
                Op::Zero(o, l) => {
                    let l = l.min(SIZE - o);
                    dev.write_zeroes(o as u64, l as u64, ZeroFlags::default()).unwrap();
                    model.zero(o, l);
                }
                Op::Reopen => {
                    dev.flush().unwrap();
                    dev = open(&s);
                }
            }
        }
        prop_assert_eq!(read_all(dev.as_ref()), model.bytes);
    }
}

#[test]
fn crash_keeps_flushed_writes() {
    // Count the operations of the workload, then cut at each one.
    let workload = |dev: &dyn BlockDevice| -> diskimg_blockio::Result<()> {
        dev.write_at(&[1; 4096], 0)?;
        dev.flush()?;
        dev.write_at(&[2; 4096], 8192)?;
        dev.write_zeroes(0, 512, ZeroFlags::default())?;
        dev.flush()?;
        dev.write_at(&[3; 100], 100_000)
    };
    let counter = Arc::new(FaultStorage::new(vec![0; SIZE], None));
    let d = diskimg_raw::DRIVER
        .open(counter.clone(), &OpenOptions::new())
        .unwrap();
    workload(d.as_ref()).unwrap();
    let total = counter.ops();
    assert!(total >= 6);
    for cut in 0..=total {
        let s = Arc::new(FaultStorage::new(vec![0; SIZE], Some(cut)));
        let d = diskimg_raw::DRIVER
            .open(s.clone(), &OpenOptions::new())
            .unwrap();
        let _ = workload(d.as_ref());
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut),
        ] {
            let img = s.crash_image(mode);
            assert_eq!(img.len(), SIZE);
            // Flush #1 is operation 1: once it succeeded, block 0 must hold 1s.
            if cut > 1 {
                assert!(img[512..4096].iter().all(|&b| b == 1), "cut {cut} {mode:?}");
            }
            if cut > 4 {
                assert!(img[8192..12288].iter().all(|&b| b == 2), "cut {cut}");
                assert!(img[..512].iter().all(|&b| b == 0), "cut {cut}");
            }
            let reopened = Arc::new(MemStorage::from_vec(img));
            let dev = diskimg_raw::DRIVER
                .open(reopened as Arc<dyn Storage>, &OpenOptions::new())
                .unwrap();
            assert_eq!(dev.virtual_size(), SIZE as u64);
        }
    }
}
