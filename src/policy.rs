//! Which other host files an image may make diskimg open.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use diskimg_blockio::{Error, FilePurpose, FileStorage, HostFiles, Result, Storage};

/// A rule for one kind of referenced file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathRule {
    /// Never open such files.
    #[default]
    Deny,
    /// Only plain file names in the referencing image's directory (no `/`, no `..`).
    Beside,
    /// Relative paths, resolved against the referencing image's directory, without `..`
    /// and without absolute paths.
    Relative,
    /// Anything, as qemu does (relative names resolved against the image's directory).
    Any,
}

impl PathRule {
    /// Resolves `name` against `dir`, or explains why the rule refuses it.
    pub fn resolve(self, dir: &Path, name: &str) -> std::result::Result<PathBuf, &'static str> {
        if name.is_empty() {
            return Err("the name is empty");
        }
        if name.contains('\0') {
            return Err("the name contains a NUL byte");
        }
        let p = Path::new(name);
        let absolute = p.is_absolute();
        let has_parent = p.components().any(|c| matches!(c, Component::ParentDir));
        let has_dir = p.components().count() > 1;
        match self {
            PathRule::Deny => Err("the open policy allows no such files"),
            PathRule::Beside if absolute || has_parent || has_dir => {
                Err("only files beside the image are allowed")
            }
            PathRule::Relative if absolute || has_parent => {
                Err("only relative paths below the image's directory are allowed")
            }
            PathRule::Any if absolute => Ok(p.to_path_buf()),
            _ => Ok(dir.join(p)),
        }
    }
}

/// Rules for every kind of file an image can reference.
///
/// The library default ([`OpenPolicy::default`]) denies all of them; the CLI uses
/// [`OpenPolicy::qemu_compatible`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenPolicy {
    /// Backing files (qcow2, vmdk parents, vhd/vhdx parents).
    pub backing: PathRule,
    /// External data files (qcow2 `data_file`).
    pub data_files: PathRule,
    /// Extent files of multi-file images (VMDK).
    pub extents: PathRule,
    /// Longest backing chain followed.
    pub max_chain_depth: u32,
}

impl Default for OpenPolicy {
    fn default() -> Self {
        Self {
            backing: PathRule::Deny,
            data_files: PathRule::Deny,
            extents: PathRule::Deny,
            max_chain_depth: 64,
        }
    }
}

impl OpenPolicy {
    /// Deny every referenced file (a lone image, no chain).
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// What `qemu-img` users expect: backing chains and data files anywhere, VMDK
    /// extents only beside their descriptor (the CVE-2022-47951 class of attack).
    pub fn qemu_compatible() -> Self {
        Self {
            backing: PathRule::Any,
            data_files: PathRule::Any,
            extents: PathRule::Beside,
            max_chain_depth: 64,
        }
    }

    /// Relative chains and files below the image's directory only.
    pub fn relative_only() -> Self {
        Self {
            backing: PathRule::Relative,
            data_files: PathRule::Relative,
            extents: PathRule::Beside,
            max_chain_depth: 64,
        }
    }

    fn rule(&self, purpose: FilePurpose) -> PathRule {
        match purpose {
            FilePurpose::Backing => self.backing,
            FilePurpose::DataFile => self.data_files,
            FilePurpose::Extent => self.extents,
        }
    }
}

/// [`HostFiles`] for one image: names resolved against its directory under a policy.
#[derive(Debug)]
pub(crate) struct PolicyFiles {
    pub(crate) dir: PathBuf,
    pub(crate) policy: OpenPolicy,
    pub(crate) read_only: bool,
    /// The cache mode of the image, for its other files too (as qemu's children).
    pub(crate) cache: diskimg_blockio::CacheMode,
}

impl PolicyFiles {
    fn path(&self, name: &str, purpose: FilePurpose) -> Result<PathBuf> {
        self.policy
            .rule(purpose)
            .resolve(&self.dir, name)
            .map_err(|reason| Error::BackingDenied {
                path: name.to_string(),
                purpose: purpose.as_str(),
                reason,
            })
    }
}

impl HostFiles for PolicyFiles {
    fn open(&self, name: &str, purpose: FilePurpose, writable: bool) -> Result<Arc<dyn Storage>> {
        let path = self.path(name, purpose)?;
        let ro = self.read_only || !writable;
        Ok(Arc::new(FileStorage::open_with(path, ro, self.cache)?))
    }

    fn create(&self, name: &str, purpose: FilePurpose) -> Result<Arc<dyn Storage>> {
        let path = self.path(name, purpose)?;
        Ok(Arc::new(FileStorage::create(path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let d = Path::new("/img");
        assert!(PathRule::Deny.resolve(d, "a").is_err());
        assert_eq!(
            PathRule::Beside.resolve(d, "a").unwrap(),
            Path::new("/img/a")
        );
        assert!(PathRule::Beside.resolve(d, "x/a").is_err());
        assert!(PathRule::Beside.resolve(d, "../a").is_err());
        assert!(PathRule::Beside.resolve(d, "/etc/passwd").is_err());
        assert!(PathRule::Relative.resolve(d, "x/a").is_ok());
        assert!(PathRule::Relative.resolve(d, "x/../../a").is_err());
        assert_eq!(
            PathRule::Any.resolve(d, "/etc/passwd").unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            PathRule::Any.resolve(d, "../b").unwrap(),
            Path::new("/img/../b")
        );
        assert!(PathRule::Any.resolve(d, "").is_err());
    }
}
