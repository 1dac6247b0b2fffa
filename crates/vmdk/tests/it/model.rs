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

/// `HostFiles` over named in-memory storages (for delta disks without a file system).
#[derive(Debug, Default)]
struct MemFiles(std::sync::Mutex<std::collections::HashMap<String, Arc<MemStorage>>>);

impl diskimg_blockio::HostFiles for MemFiles {
    fn open(
        &self,
        name: &str,
        purpose: diskimg_blockio::FilePurpose,
        _w: bool,
    ) -> diskimg_blockio::Result<Arc<dyn Storage>> {
        match self.0.lock().unwrap().get(name) {
            Some(s) => Ok(s.clone()),
            None => Err(diskimg_blockio::Error::BackingDenied {
                path: name.to_string(),
                purpose: purpose.as_str(),
                reason: "no such in-memory file",
            }),
        }
    }
    fn create(
        &self,
        name: &str,
        _p: diskimg_blockio::FilePurpose,
    ) -> diskimg_blockio::Result<Arc<dyn Storage>> {
        let s = Arc::new(MemStorage::new());
        self.0.lock().unwrap().insert(name.to_string(), s.clone());
        Ok(s)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    /// A delta disk over a parent: partial writes copy the parent's grain, zero writes
    /// hide it, reopening keeps everything.
    #[test]
    fn delta_matches_model(ops in proptest::collection::vec(op(), 1..20)) {
        let files = Arc::new(MemFiles::default());
        let parent_s = Arc::new(MemStorage::new());
        files.0.lock().unwrap().insert("parent.vmdk".into(), parent_s.clone());
        let mut req = CreateRequest::new(SIZE as u64, OptionList::new()).image_name("parent.vmdk");
        diskimg_vmdk::DRIVER.create(parent_s.clone(), &mut req).unwrap();
        let parent = diskimg_vmdk::DRIVER.open(parent_s.clone(), &OpenOptions::new()).unwrap();
        let base = diskimg_testutil::pattern(77, SIZE);
        parent.write_at(&base[..300_000], 0).unwrap();
        parent.write_at(&base[700_000..], 700_000).unwrap();
        parent.flush().unwrap();
        let mut model = Model::zeroed(SIZE);
        model.write(0, &base[..300_000]);
        model.write(700_000, &base[700_000..]);
        let parent: Arc<dyn diskimg_blockio::BlockDevice> = diskimg_vmdk::DRIVER
            .open(parent_s.clone(), &OpenOptions::new().read_only(true)).unwrap();

        let child_s = Arc::new(MemStorage::new());
        let mut req = CreateRequest::new(SIZE as u64, OptionList::parse("backing_file=parent.vmdk,backing_fmt=vmdk").unwrap())
            .image_name("child.vmdk")
            .files(files.clone());
        diskimg_vmdk::DRIVER.create(child_s.clone(), &mut req).unwrap();
        let storage: Arc<dyn Storage> = child_s.clone();
        let open_child = || {
            let d = diskimg_vmdk::DRIVER.open(storage.clone(), &OpenOptions::new()).unwrap();
            d.set_backing(Some(parent.clone())).unwrap();
            d
        };
        let mut dev = open_child();
        prop_assert_eq!(dev.info().backing.unwrap().filename, "parent.vmdk");
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
                Op::Discard(o, l) => dev.discard(o as u64, l as u64).unwrap(),
                Op::Reopen => {
                    dev.flush().unwrap();
                    dev = open_child();
                }
            }
        }
        prop_assert!(read_all(dev.as_ref()) == model.bytes);
    }
}
