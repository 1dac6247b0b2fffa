//! `json:{…}` image names in the facade: the input, after `json:`, is parsed by
//! `diskimg::json_options` and stored as the backing file name of a small qcow2 image,
//! which is then opened through `diskimg::open` under `OpenPolicy::relative_only()` in a
//! scratch directory holding `base.raw` and `base.qcow2`. So the name's format driver, its
//! `raw` nodes with hostile `offset` / `size` windows (`WindowStorage`), its nesting and
//! its file names (resolved against the policy; `top.qcow2` itself makes a loop) all meet
//! real files, and the chain is mapped, read and checked.
#![no_main]
#[path = "../common/touch.rs"]
mod touch;

use diskimg::{Format, ImageOptions, OpenPolicy};
use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OptionList, RepairMode, Storage,
};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// Where the backing name is stored in the header cluster (4 KiB clusters).
const NAME_AT: usize = 0x800;
/// qcow2's longest backing file name.
const NAME_MAX: usize = 1023;

struct Scratch {
    _dir: tempfile::TempDir,
    top: PathBuf,
    template: Vec<u8>,
}

fn qcow2_bytes(size: u64, cluster: &str, fill: Option<u8>) -> Vec<u8> {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut o = OptionList::new();
    o.set("cluster_size", cluster);
    diskimg_qcow2::DRIVER
        .create(storage.clone(), &mut CreateRequest::new(size, o))
        .expect("create qcow2");
    if let Some(b) = fill {
        let dev = diskimg_qcow2::DRIVER
            .open(storage.clone(), &diskimg_blockio::OpenOptions::new())
            .expect("open qcow2");
        dev.write_at(&[b; 3000], 1000).expect("write");
        dev.close().expect("close");
    }
    let mut v = vec![0u8; storage.len().unwrap() as usize];
    storage.read_exact_at(&mut v, 0).unwrap();
    v
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw: Vec<u8> = (0..65536u32).map(|i| (i / 512) as u8).collect();
        std::fs::write(dir.path().join("base.raw"), raw).unwrap();
        std::fs::write(
            dir.path().join("base.qcow2"),
            qcow2_bytes(65536, "512", Some(7)),
        )
        .unwrap();
        Scratch {
            top: dir.path().join("top.qcow2"),
            template: qcow2_bytes(65536, "4096", None),
            _dir: dir,
        }
    })
}

/// Reads what `dev` shows (a budget of 16 extents), then checks it.
fn touch_and_check(dev: &dyn BlockDevice) {
    touch::touch(dev, 16);
    let _ = dev.check(RepairMode::None);
}

fuzz_target!(|data: &[u8]| {
    let mut name = b"json:".to_vec();
    name.extend_from_slice(data);
    if name.len() > NAME_MAX {
        return;
    }
    if let Ok(text) = std::str::from_utf8(&name) {
        let _ = diskimg::json_options(text);
    }
    let s = scratch();
    let mut img = s.template.clone();
    img[8..16].copy_from_slice(&(NAME_AT as u64).to_be_bytes());
    img[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    img[NAME_AT..NAME_AT + name.len()].copy_from_slice(&name);
    if std::fs::write(&s.top, &img).is_err() {
        return;
    }
    let mut opts = ImageOptions::default();
    opts.read_only = true;
    opts.locking = false;
    opts.policy = OpenPolicy::relative_only();
    if let Ok(image) = diskimg::open(&s.top, Some(Format::Qcow2), &opts) {
        touch_and_check(image.device.as_ref());
    }
});
