#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Integration tests for diskimg-qcow2, cross-checked against qemu-img / qemu-io.

mod bitmaps;
mod check;
mod compressed;
mod crash;
mod crash_alloc;
pub mod crash_harness;
mod crash_snapshot;
mod crash_tables;
mod crash_threads;
mod encrypt;
mod epoch;
mod hostile;
mod hostile_bounded;
pub(crate) mod hostile_rw;
pub(crate) mod image_end;
mod layout;
mod lazy;
mod maint;
mod model;
mod offload;
mod overlap;
mod read;
mod reserve_release;
mod shared_stress;
mod shared_write;
mod snapshots;
mod vectored_write;
mod write;
mod zero_shared;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, Driver, FilePurpose, FileStorage, HostFiles, OpenOptions, Result, Storage,
    map_chain,
};
use diskimg_qcow2::DRIVER;

pub use crash_harness::{assert_cut_checks_clean, assert_qemu_check_agrees, crash_images};

/// Opens names relative to one directory (test stand-in for the facade's policy).
#[derive(Debug)]
pub struct DirFiles(pub PathBuf);

impl HostFiles for DirFiles {
    fn open(&self, name: &str, _p: FilePurpose, writable: bool) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(self.0.join(name), !writable)?))
    }
    fn create(&self, name: &str, _p: FilePurpose) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::create(self.0.join(name))?))
    }
}

/// Open options with a [`DirFiles`] for `dir`.
pub fn opts(dir: &Path, ro: bool) -> OpenOptions {
    OpenOptions::new()
        .read_only(ro)
        .files(Arc::new(DirFiles(dir.to_path_buf())))
}

/// Opens a qcow2 file with our driver.
pub fn open(path: &Path, ro: bool) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, ro).unwrap());
    DRIVER.open(s, &opts(path.parent().unwrap(), ro)).unwrap()
}

/// Creates a qcow2 file with our driver.
pub fn create(path: &Path, size: u64, options: &str) -> Result<()> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(path)?);
    let mut req =
        diskimg_blockio::CreateRequest::new(size, diskimg_blockio::OptionList::parse(options)?)
            .files(Arc::new(DirFiles(path.parent().unwrap().to_path_buf())));
    DRIVER.create(s, &mut req)?;
    req.options.clone().finish("qcow2")
}

/// The guest bytes of snapshot `sel` (`snapshot.name=N` / `snapshot.id=I`) of the qcow2
/// image at `img`, as `qemu-img convert -l` reads them.
pub fn qemu_snapshot_raw(img: &Path, sel: &str) -> Vec<u8> {
    let out = img.with_extension("snap.raw");
    diskimg_testutil::qemu_img_ok(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "-l",
        sel,
        &img.to_string_lossy(),
        &out.to_string_lossy(),
    ]);
    std::fs::read(&out).unwrap()
}

/// Our map of `dev` in the shape of `qemu-img map --output=json`'s entries.
pub fn map_json(dev: &dyn BlockDevice) -> Vec<serde_json::Value> {
    map_chain(dev, 0, dev.virtual_size())
        .unwrap()
        .iter()
        .map(|e| {
            let mut v = serde_json::json!({
                "start": e.start, "length": e.length, "depth": e.depth,
                "present": e.present, "zero": e.zero, "data": e.data,
                "compressed": e.compressed,
            });
            if let Some(o) = e.offset {
                v["offset"] = o.into();
            }
            v
        })
        .collect()
}

/// Asserts our map of `dev` equals `qemu-img map --output=json` of `path`.
pub fn assert_map_matches(dev: &dyn BlockDevice, path: &Path) {
    let q = diskimg_testutil::qemu_map_json(path, "qcow2");
    let ours = map_json(dev);
    // Unallocated subclusters of allocated extended-L2 clusters carry their host
    // offset in both.
    let theirs: Vec<serde_json::Value> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("filename");
            e
        })
        .collect();
    let (ours, theirs) = (merge(ours), merge(theirs));
    assert_eq!(
        serde_json::Value::from(ours),
        serde_json::Value::from(theirs),
        "map of {}",
        path.display()
    );
}

/// Merges neighbours that became identical after normalisation.
fn merge(v: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = Vec::new();
    for e in v {
        if let Some(last) = out.last_mut() {
            let key = |x: &serde_json::Value| {
                let mut x = x.clone();
                let o = x.as_object_mut().unwrap();
                o.remove("start");
                o.remove("length");
                o.remove("offset");
                x
            };
            let end = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap();
            let contiguous = match (last.get("offset"), e.get("offset")) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    a.as_u64().unwrap() + last["length"].as_u64().unwrap() == b.as_u64().unwrap()
                }
                _ => false,
            };
            if end == e["start"].as_u64().unwrap() && key(last) == key(&e) && contiguous {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// InfoValue → JSON.
pub fn info_json(v: &diskimg_blockio::InfoValue) -> serde_json::Value {
    use diskimg_blockio::InfoValue as I;
    match v {
        I::Bool(b) => (*b).into(),
        I::Int(i) => (*i).into(),
        I::Str(s) => s.clone().into(),
        I::List(l) => l.iter().map(info_json).collect::<Vec<_>>().into(),
        I::Map(m) => {
            let mut o = serde_json::Map::new();
            for (k, v) in m {
                o.insert(k.clone(), info_json(v));
            }
            o.into()
        }
    }
}
