//! Opening host files without surprises: non-blocking (a FIFO cannot hang the open),
//! the file type checked on the opened descriptor, and the [`HostFiles`] object through
//! which format drivers reach the files an image names.

use std::fs::{File, FileType};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(target_os = "linux")]
use diskimg_blockio::UringStorage;
use diskimg_blockio::{CacheMode, Error, FilePurpose, FileStorage, HostFiles, Result, Storage};
use rustix::fs::{Mode, OFlags};

use crate::policy::{OpenPolicy, SpecialFiles};

/// Whether `allowed` admits a file of type `t`, or why not.
pub(crate) fn check_kind(
    t: &FileType,
    allowed: SpecialFiles,
) -> std::result::Result<(), &'static str> {
    let ok = t.is_file()
        || allowed == SpecialFiles::Allow && !t.is_dir()
        || allowed == SpecialFiles::BlockDevices && t.is_block_device();
    if ok {
        return Ok(());
    }
    Err(if t.is_dir() {
        "it is a directory"
    } else if t.is_fifo() {
        "it is a FIFO (the open policy allows regular files only)"
    } else if t.is_socket() {
        "it is a socket (the open policy allows regular files only)"
    } else if t.is_char_device() {
        "it is a character device (the open policy allows regular files only)"
    } else if t.is_block_device() {
        "it is a block device (the open policy allows regular files only)"
    } else {
        "it is not a regular file"
    })
}

/// Opens `path` without blocking (`O_NONBLOCK`: opening a FIFO returns at once) and
/// checks the type of what was opened against `allowed`, so a file swapped after a
/// path check is judged too. `purpose` names the file in a refusal.
pub(crate) fn open_file(
    path: &Path,
    read_only: bool,
    allowed: SpecialFiles,
    purpose: Option<FilePurpose>,
) -> Result<FileStorage> {
    open_file_with(path, read_only, allowed, purpose, CacheMode::Writeback)
}

/// [`open_file`] in cache mode `cache` (with its open flags: `O_DIRECT`, `O_SYNC`).
pub(crate) fn open_file_with(
    path: &Path,
    read_only: bool,
    allowed: SpecialFiles,
    purpose: Option<FilePurpose>,
    cache: CacheMode,
) -> Result<FileStorage> {
    let access = if read_only {
        OFlags::RDONLY
    } else {
        OFlags::RDWR
    };
    let cache_flags = OFlags::from_bits_retain(cache.open_flags(read_only));
    let fd = rustix::fs::open(
        path,
        access | OFlags::NONBLOCK | OFlags::CLOEXEC | cache_flags,
        Mode::empty(),
    )
    .map_err(|e| cache.open_error(path, e.into()))?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("could not stat '{}'", path.display()), e))?;
    if let Err(reason) = check_kind(&meta.file_type(), allowed) {
        return Err(match purpose {
            Some(p) => Error::BackingDenied {
                path: path.display().to_string(),
                purpose: p.as_str(),
                reason,
            },
            None => Error::invalid(format!("'{}': {reason}", path.display())),
        });
    }
    FileStorage::from_file_with(file, read_only, cache)
}

/// Opens an image the user named (not one an image names): files and devices, but not
/// a FIFO or socket, whose open could block and which cannot be read by offset.
pub(crate) fn open_user_file(
    path: &Path,
    read_only: bool,
    cache: CacheMode,
) -> Result<FileStorage> {
    let s = open_file_with(path, read_only, SpecialFiles::Allow, None, cache)?;
    let t = s
        .file()
        .metadata()
        .map_err(|e| Error::io(format!("could not stat '{}'", path.display()), e))?
        .file_type();
    if t.is_fifo() || t.is_socket() {
        return Err(Error::invalid(format!(
            "'{}' is a {}: an image must be a file or a device",
            path.display(),
            if t.is_fifo() { "FIFO" } else { "socket" }
        )));
    }
    Ok(s)
}

/// [`HostFiles`] for one image: names resolved against its directory under a policy.
#[derive(Debug)]
pub(crate) struct PolicyFiles {
    pub(crate) dir: PathBuf,
    pub(crate) policy: OpenPolicy,
    pub(crate) read_only: bool,
    /// Hand out [`Unopened`] placeholders for data files instead of opening them (for
    /// metadata-only opens such as `info`).
    pub(crate) defer_data_files: bool,
    /// How the files opened here are locked (`None`: not at all).
    pub(crate) lock_mode: Option<crate::locking::LockMode>,
    /// The locks taken, held by the image.
    pub(crate) locks: crate::locking::HeldLocks,
    /// The image's cache mode, for its other files too (as qemu's children).
    pub(crate) cache: CacheMode,
    /// The image's io_uring, for its other files too.
    #[cfg(target_os = "linux")]
    pub(crate) io_uring: Option<Arc<diskimg_blockio::Uring>>,
    /// Wraps the files opened here ([`StorageHook`]).
    pub(crate) hook: Option<StorageHook>,
    /// Filter drivers for `json:` backing names ([`crate::ImageOptions::node_drivers`]).
    pub(crate) drivers: crate::NodeDrivers,
    /// The image's driver options are the user's (the top image), so files they name
    /// ([`HostFiles::open_given`]) are opened as given rather than judged by the policy.
    pub(crate) user_options: bool,
}

impl HostFiles for PolicyFiles {
    fn open(&self, name: &str, purpose: FilePurpose, writable: bool) -> Result<Arc<dyn Storage>> {
        if self.defer_data_files && purpose == FilePurpose::DataFile {
            return Ok(Arc::new(Unopened {
                name: name.to_string(),
            }));
        }
        // A `json:{…}` backing name (a parent a format reads itself, vmdk's): its file,
        // under the nodes it names.
        let node = match purpose == FilePurpose::Backing && name.starts_with("json:") {
            true => Some(crate::jsonname::backing_node(name, &self.drivers)?),
            false => None,
        };
        let name = node.as_ref().map_or(name, |n| n.path.as_str());
        let path = self.policy.resolve(purpose, &self.dir, name)?;
        let mut s = self.open_path(&path, purpose, writable, self.policy.special_files)?;
        if let Some(n) = &node {
            s = n.wrap(s);
        }
        Ok(StorageHook::wrap(self.hook.as_ref(), Some(purpose), s))
    }

    fn open_given(
        &self,
        name: &str,
        purpose: FilePurpose,
        writable: bool,
    ) -> Result<Arc<dyn Storage>> {
        if !self.user_options || self.defer_data_files && purpose == FilePurpose::DataFile {
            // Options a backing image's `json:` name carries: judged as names it stores.
            return self.open(name, purpose, writable);
        }
        // The user named it beside the image: opened as given, as the image is.
        let path = PathBuf::from(name);
        let s = self.open_path(&path, purpose, writable, SpecialFiles::Allow)?;
        Ok(StorageHook::wrap(self.hook.as_ref(), Some(purpose), s))
    }

    fn create(&self, name: &str, purpose: FilePurpose) -> Result<Arc<dyn Storage>> {
        let path = self.create_path(name, purpose)?;
        Ok(Arc::new(if self.lock_mode.is_some() {
            FileStorage::create_locked(&path, &path.to_string_lossy())?
        } else {
            FileStorage::create(path)?
        }))
    }
}

impl PolicyFiles {
    /// Opens `path` (already judged) as this image's file of `purpose`: locked and on the
    /// image's ring (the caller puts it under the image's hook).
    fn open_path(
        &self,
        path: &Path,
        purpose: FilePurpose,
        writable: bool,
        kinds: SpecialFiles,
    ) -> Result<Arc<dyn Storage>> {
        let ro = self.read_only || !writable;
        let file = Arc::new(open_file_with(path, ro, kinds, Some(purpose), self.cache)?);
        if let Some(mode) = self.lock_mode {
            // Data files and extents are a format driver's storage, locked as such.
            self.locks
                .lock(&file, mode.perms(None, !ro), &path.to_string_lossy())?;
        }
        #[cfg(target_os = "linux")]
        if let Some(ring) = &self.io_uring {
            return Ok(Arc::new(UringStorage::from_arc(file, ring.clone())));
        }
        Ok(file)
    }

    /// Where a new file named `name` goes: beside the image, except that a relative data
    /// file name under [`PathRule::Any`](crate::PathRule::Any) is created where qemu-img
    /// creates it (against the working directory), so qemu opens what we create.
    fn create_path(&self, name: &str, purpose: FilePurpose) -> Result<PathBuf> {
        let rule = self.policy.rule(purpose);
        let path = rule
            .resolve(&self.dir, name)
            .map_err(|reason| Error::BackingDenied {
                path: name.to_string(),
                purpose: purpose.as_str(),
                reason,
            })?;
        if purpose == FilePurpose::DataFile
            && rule == crate::PathRule::Any
            && Path::new(name).is_relative()
        {
            return Ok(PathBuf::from(name));
        }
        Ok(path)
    }
}

/// A referenced file that was deliberately not opened (a qcow2 data file during a
/// metadata-only open): every access fails, naming the file.
#[derive(Debug)]
struct Unopened {
    name: String,
}

impl Unopened {
    fn refuse<T>(&self) -> Result<T> {
        Err(Error::invalid(format!(
            "the data file '{}' was not opened (metadata-only open)",
            self.name
        )))
    }
}

impl Storage for Unopened {
    fn read_exact_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        self.refuse()
    }
    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        self.refuse()
    }
    fn len(&self) -> Result<u64> {
        self.refuse()
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        self.refuse()
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

/// A function that may wrap each storage of the top image before its format driver
/// sees it: called with `None` for the image file and with the purpose for each file
/// the driver opens (an external data file, an extent), it returns the storage to use.
/// Test programs put error injection there (the CLI's `blkdebug` nodes below a format);
/// backing images are opened without it.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct StorageHook(
    pub Arc<dyn Fn(Option<FilePurpose>, Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync>,
);

impl std::fmt::Debug for StorageHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageHook")
    }
}

impl StorageHook {
    /// The storage to use for `storage` (of `purpose`; `None`: the image file).
    pub(crate) fn wrap(
        hook: Option<&StorageHook>,
        purpose: Option<FilePurpose>,
        storage: Arc<dyn Storage>,
    ) -> Arc<dyn Storage> {
        match hook {
            Some(h) => (h.0)(purpose, storage),
            None => storage,
        }
    }
}
