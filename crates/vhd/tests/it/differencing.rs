//! Differencing disks: creation with a parent, parent locators, reads through the
//! parent for clear bitmap bits, writes that never touch the parent.

use std::path::PathBuf;
use std::sync::Arc;

use diskimg_blockio::{
    CreateRequest, Driver, Error, ExtentKind, FilePurpose, FileStorage, HostFiles, OptionList,
    Result, Storage, map_all,
};
use diskimg_testutil::{Model, pattern, qemu_img_ok, qemu_io, qemu_read_raw, read_all, tempdir};
use diskimg_vhd::VhdDevice;

use crate::open;

/// Opens files relative to one directory (what the facade's policy object does).
#[derive(Debug)]
struct Dir(PathBuf);

impl HostFiles for Dir {
    fn open(&self, name: &str, _p: FilePurpose, w: bool) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(self.0.join(name), !w)?))
    }
    fn create(&self, name: &str, _p: FilePurpose) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::create(self.0.join(name))?))
    }
}

pub(crate) fn make_child(dir: &std::path::Path, child: &str, parent: &str) {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(dir.join(child)).unwrap());
    let opts = OptionList::parse(&format!("backing_file={parent},backing_fmt=vpc")).unwrap();
    let mut req = CreateRequest::new(0, opts).files(Arc::new(Dir(dir.to_path_buf())));
    diskimg_vhd::DRIVER.create(s, &mut req).unwrap();
    assert!(req.options.is_empty());
}

#[test]
fn child_reads_parent_and_keeps_its_own_writes() {
    let dir = tempdir();
    let base = dir.path().join("base.vhd");
    qemu_img_ok(&["create", "-q", "-f", "vpc", base.to_str().unwrap(), "8M"]);
    qemu_io(&base, "vpc", &["write -P 0x5a 0 3M", "write -P 0xa5 5M 1M"]);
    let base_bytes = qemu_read_raw(&base, "vpc");
    make_child(dir.path(), "child.vhd", "base.vhd");

    let child = open(&dir.path().join("child.vhd"), false);
    let info = child.info();
    let b = info.backing.clone().unwrap();
    assert_eq!(b.filename, "base.vhd");
    assert_eq!(b.format.as_deref(), Some("vpc"));
    assert_eq!(info.virtual_size, base_bytes.len() as u64);
    // Parent linkage: the child's parent UUID is the parent's footer UUID.
    let parent = open(&base, true);
    let pv = parent.as_any().downcast_ref::<VhdDevice>().unwrap();
    let cv = child.as_any().downcast_ref::<VhdDevice>().unwrap();
    assert_eq!(cv.parent_uuid(), Some(pv.uuid()));

    // Without a parent, clear bits read as zeroes; with it, as the parent.
    assert!(read_all(child.as_ref()).iter().all(|&x| x == 0));
    child.set_backing(Some(parent.clone())).unwrap();
    assert_eq!(read_all(child.as_ref()), base_bytes);
    assert!(matches!(
        child.map(0, 4096).unwrap().kind,
        ExtentKind::Unallocated { .. }
    ));

    let mut m = Model {
        bytes: base_bytes.clone(),
    };
    for (i, (off, len)) in [
        (100u64, 1000usize),
        (2_097_000, 3000),
        (5_500_001, 10),
        (8_388_000, 608),
    ]
    .into_iter()
    .enumerate()
    {
        let d = pattern(i as u64 + 7, len);
        child.write_at(&d, off).unwrap();
        m.write(off as usize, &d);
    }
    child
        .write_zeroes(4_000_000, 300_000, Default::default())
        .unwrap();
    m.zero(4_000_000, 300_000);
    assert_eq!(read_all(child.as_ref()), m.bytes);
    child.flush().unwrap();
    drop(child);

    // Reopened, with the parent attached again: same content; the parent is untouched.
    let child = open(&dir.path().join("child.vhd"), true);
    child.set_backing(Some(open(&base, true))).unwrap();
    assert_eq!(read_all(child.as_ref()), m.bytes);
    assert_eq!(qemu_read_raw(&base, "vpc"), base_bytes);
    let ext = map_all(child.as_ref(), 0, child.virtual_size()).unwrap();
    assert!(ext.iter().any(|e| !e.kind.is_present()));
    assert!(
        ext.iter()
            .any(|e| matches!(e.kind, ExtentKind::Data { .. }))
    );
    let r = child.check(Default::default()).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
}

#[test]
fn locators_relative_and_absolute() {
    let dir = tempdir();
    let base = dir.path().join("base.vhd");
    crate::create(&base, 4 << 20, "");
    make_child(dir.path(), "c1.vhd", "base.vhd");
    let abs = base.to_str().unwrap().to_string();
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(dir.path().join("c2.vhd")).unwrap());
    let p = FileStorage::open(&base, true).unwrap();
    diskimg_vhd::create_differencing(s.as_ref(), &p, &abs).unwrap();
    let c2 = open(&dir.path().join("c2.vhd"), true);
    assert_eq!(c2.info().backing.unwrap().filename, abs);
    // A child of a child.
    make_child(dir.path(), "c3.vhd", "c1.vhd");
    let c3 = open(&dir.path().join("c3.vhd"), true);
    let c1 = open(&dir.path().join("c1.vhd"), true);
    let c1v = c1.as_any().downcast_ref::<VhdDevice>().unwrap();
    assert_eq!(
        c3.as_any()
            .downcast_ref::<VhdDevice>()
            .unwrap()
            .parent_uuid(),
        Some(c1v.uuid())
    );
    // The parent must be the VHD the child was made from.
    let wrong = c3.set_backing(Some(open(&base, true))).unwrap_err();
    assert!(wrong.to_string().contains("unique id"), "{wrong}");
    c3.set_backing(Some(c1.clone())).unwrap();
    // The absolute-path child also offers the parent's name beside it.
    assert_eq!(
        c2.info().backing.unwrap().alternates,
        vec!["base.vhd".to_string()]
    );
    // A dynamic disk takes no parent; a non-VHD parent is refused.
    let d = open(&base, true);
    assert!(d.set_backing(Some(c1.clone())).is_err());
    std::fs::write(dir.path().join("r.raw"), vec![0u8; 4096]).unwrap();
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(dir.path().join("c4.vhd")).unwrap());
    let opts = OptionList::parse("backing_file=r.raw,backing_fmt=vpc").unwrap();
    let mut req = CreateRequest::new(0, opts).files(Arc::new(Dir(dir.path().to_path_buf())));
    let e = diskimg_vhd::DRIVER.create(s, &mut req).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}
