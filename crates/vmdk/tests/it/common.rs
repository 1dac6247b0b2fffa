//! Shared helpers: a directory-backed `HostFiles`, open/create shortcuts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, Error, FilePurpose, FileStorage, HostFiles, OpenOptions,
    OptionList, Result, Storage,
};

/// Test-only `HostFiles`: plain names inside one directory.
#[derive(Debug)]
pub(crate) struct DirFiles(pub PathBuf);

impl DirFiles {
    fn path(&self, name: &str, purpose: FilePurpose) -> Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name == ".." || name == "." {
            return Err(Error::BackingDenied {
                path: name.to_string(),
                purpose: purpose.as_str(),
                reason: "only plain names beside the image",
            });
        }
        Ok(self.0.join(name))
    }
}

impl HostFiles for DirFiles {
    fn open(&self, name: &str, purpose: FilePurpose, writable: bool) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(
            self.path(name, purpose)?,
            !writable,
        )?))
    }
    fn create(&self, name: &str, purpose: FilePurpose) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::create(self.path(name, purpose)?)?))
    }
}

pub(crate) fn dir_of(p: &Path) -> PathBuf {
    p.parent().unwrap().to_path_buf()
}

pub(crate) fn open(path: &Path, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, read_only)?);
    let opts = OpenOptions::new()
        .read_only(read_only)
        .files(Arc::new(DirFiles(dir_of(path))));
    diskimg_vmdk::DRIVER.open(s, &opts)
}

pub(crate) fn create(path: &Path, size: u64, opts: &str) -> Result<()> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(path)?);
    let mut req = CreateRequest::new(size, OptionList::parse(opts)?)
        .files(Arc::new(DirFiles(dir_of(path))))
        .image_name(path.file_name().unwrap().to_string_lossy().into_owned());
    diskimg_vmdk::DRIVER.create(s, &mut req)?;
    std::mem::take(&mut req.options).finish("vmdk")
}

pub(crate) fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

pub(crate) const SUBFORMATS: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

/// Writes `data` to a raw file of `size` bytes (the expected content).
pub(crate) fn raw_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}
