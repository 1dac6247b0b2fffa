//! Which other host files an image may make diskimg open.
//!
//! A name stored in an image is judged twice: lexically ([`PathRule::resolve`]: no `/`,
//! no `..`, no absolute path, as the rule says) and then by what it *resolves to*
//! ([`OpenPolicy::resolve`]): the canonical real path, every symbolic link followed,
//! must still satisfy the rule against the image's own real directory, and the file must
//! be of a kind the policy allows ([`SpecialFiles`]). A link named like a file beside the
//! image but pointing at `/etc/passwd` is therefore refused by `Beside` and `Relative`.

use std::path::{Component, Path, PathBuf};

use diskimg_blockio::{Error, FilePurpose, Result};

/// A rule for one kind of referenced file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathRule {
    /// Never open such files.
    #[default]
    Deny,
    /// Only plain file names whose real file is in the referencing image's real directory
    /// (no `/`, no `..`; a symbolic link must point to a file in that directory too).
    Beside,
    /// Relative paths without `..` whose real file is below the referencing image's real
    /// directory (symbolic links followed before deciding).
    Relative,
    /// Anything, as qemu does (relative names resolved against the image's directory).
    Any,
}

impl PathRule {
    /// Resolves `name` against `dir` lexically, or explains why the rule refuses it.
    /// This looks at the name only; [`OpenPolicy::resolve`] also judges the real path.
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

    /// Whether the real (canonical) file `real` satisfies the rule for an image whose
    /// real directory is `real_dir`.
    fn admits(self, real_dir: &Path, real: &Path) -> std::result::Result<(), &'static str> {
        match self {
            PathRule::Deny => Err("the open policy allows no such files"),
            PathRule::Beside if real.parent() != Some(real_dir) => {
                Err("it resolves (through a symbolic link) to a file that is not beside the image")
            }
            PathRule::Relative if !real.starts_with(real_dir) || real == real_dir => {
                Err("it resolves (through a symbolic link) to a file outside the image's directory")
            }
            _ => Ok(()),
        }
    }
}

/// Which kinds of host file a referenced name may resolve to. Regular files are always
/// allowed; a FIFO would block an open (or a read) forever, a character device can
/// stream without end, and a socket is not a disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpecialFiles {
    /// Regular files only.
    #[default]
    Deny,
    /// Regular files and block devices (a backing image on an LVM volume).
    BlockDevices,
    /// Every kind, FIFOs and character devices included (opened non-blocking).
    Allow,
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
    /// Which kinds of file referenced names may resolve to.
    pub special_files: SpecialFiles,
}

impl Default for OpenPolicy {
    fn default() -> Self {
        Self {
            backing: PathRule::Deny,
            data_files: PathRule::Deny,
            extents: PathRule::Deny,
            max_chain_depth: 64,
            special_files: SpecialFiles::Deny,
        }
    }
}

impl OpenPolicy {
    /// Deny every referenced file (a lone image, no chain).
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// What `qemu-img` users expect: backing chains and data files anywhere (block
    /// devices included), VMDK extents only beside their descriptor (the CVE-2022-47951
    /// class of attack); never FIFOs, sockets or character devices.
    pub fn qemu_compatible() -> Self {
        Self {
            backing: PathRule::Any,
            data_files: PathRule::Any,
            extents: PathRule::Beside,
            max_chain_depth: 64,
            special_files: SpecialFiles::BlockDevices,
        }
    }

    /// Relative chains and files below the image's directory only, regular files only.
    pub fn relative_only() -> Self {
        Self {
            backing: PathRule::Relative,
            data_files: PathRule::Relative,
            extents: PathRule::Beside,
            max_chain_depth: 64,
            special_files: SpecialFiles::Deny,
        }
    }

    /// The rule for files referenced for `purpose`.
    pub fn rule(&self, purpose: FilePurpose) -> PathRule {
        match purpose {
            FilePurpose::Backing => self.backing,
            FilePurpose::DataFile => self.data_files,
            FilePurpose::Extent => self.extents,
        }
    }

    /// Resolves `name`, stored in an image whose directory is `dir`, to the canonical
    /// path of an existing file the policy allows, or fails: [`Error::BackingDenied`]
    /// when a rule refuses it, a not-found I/O error when no candidate exists.
    ///
    /// The candidates are `dir/name` (or `name` when absolute) and, for a relative data
    /// file name, also `name` against the working directory (where qemu looks: it opens
    /// data files as given, while it resolves backing names against the image). Each
    /// candidate is canonicalised (symbolic links followed) and judged by the rule
    /// against the image's canonical directory, then by its file type.
    pub fn resolve(&self, purpose: FilePurpose, dir: &Path, name: &str) -> Result<PathBuf> {
        let rule = self.rule(purpose);
        let denied = |reason| Error::BackingDenied {
            path: name.to_string(),
            purpose: purpose.as_str(),
            reason,
        };
        let first = rule.resolve(dir, name).map_err(denied)?;
        let mut candidates = vec![first];
        if purpose == FilePurpose::DataFile
            && Path::new(name).is_relative()
            && let Ok(cwd) = std::env::current_dir()
        {
            candidates.push(cwd.join(name));
        }
        let real_dir = std::fs::canonicalize(dir)
            .map_err(|e| Error::io(format!("could not resolve '{}'", dir.display()), e))?;
        let mut last = None;
        for cand in candidates {
            let real = match std::fs::canonicalize(&cand) {
                Ok(r) => r,
                Err(e) => {
                    // qemu names a data file as the image stores it, as it opens it.
                    let shown = match purpose {
                        FilePurpose::DataFile => name.to_string(),
                        _ => cand.display().to_string(),
                    };
                    last.get_or_insert(Error::io(format!("Could not open '{shown}'"), e));
                    continue;
                }
            };
            rule.admits(&real_dir, &real).map_err(denied)?;
            let meta = std::fs::metadata(&real)
                .map_err(|e| Error::io(format!("could not stat '{}'", real.display()), e))?;
            crate::hostfile::check_kind(&meta.file_type(), self.special_files).map_err(denied)?;
            return Ok(real);
        }
        Err(last.unwrap_or_else(|| denied("no candidate path")))
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

    #[test]
    fn real_paths() {
        let d = Path::new("/img");
        assert!(PathRule::Beside.admits(d, Path::new("/img/a")).is_ok());
        assert!(PathRule::Beside.admits(d, Path::new("/img/x/a")).is_err());
        assert!(
            PathRule::Beside
                .admits(d, Path::new("/etc/passwd"))
                .is_err()
        );
        assert!(PathRule::Relative.admits(d, Path::new("/img/x/a")).is_ok());
        assert!(PathRule::Relative.admits(d, Path::new("/img")).is_err());
        assert!(PathRule::Relative.admits(d, Path::new("/imgx/a")).is_err());
        assert!(PathRule::Any.admits(d, Path::new("/etc/passwd")).is_ok());
    }
}
