//! Opening images (with their backing chains) and creating them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CacheMode, Error, FilePurpose, Limits, OpenOptions, OptionList, Result, Secrets,
    Storage,
};

use crate::format::{Format, probe};
use crate::hostfile::{PolicyFiles, StorageHook, open_file_with, open_user_file};
use crate::jsonname::{BackingNode, NodeDrivers, backing_node};
use crate::locking::{HeldLocks, LockMode};
use crate::policy::OpenPolicy;

/// How [`open`] and [`create`](crate::create) behave.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ImageOptions {
    /// Open the top image read-only.
    pub read_only: bool,
    /// Which referenced files may be opened (default: none).
    pub policy: OpenPolicy,
    /// Resource bounds for every image in the chain.
    pub limits: Limits,
    /// Open the backing chain (when false, unallocated ranges read as zeroes, as with
    /// qemu's `BDRV_O_NO_BACKING`; `info` uses this).
    pub open_backing: bool,
    /// Open backing images writable (commit needs this).
    pub backing_writable: bool,
    /// Runtime driver options for the top image (qemu `--image-opts` keys). Keys starting
    /// with `backing.` apply (without the prefix) to the backing image, recursively, as
    /// qemu's `backing.encrypt.key-secret=ID`.
    pub driver_options: OptionList,
    /// Secrets (passphrases of encrypted images) that options name by id, for every image
    /// of the chain and for [`create`](crate::create) (qcow2 `encrypt.key-secret=ID`).
    pub secrets: Secrets,
    /// How every file of the chain uses the host page cache (qemu's `cache=`, qemu-img's
    /// `-t`/`-T`): `O_DIRECT` for `none`, no flushes for `unsafe` (see [`CacheMode`]).
    pub cache: CacheMode,
    /// Open for metadata only (`info`): external data files are not opened (their
    /// names are still reported; guest reads of their clusters fail).
    pub metadata_only: bool,
    /// Take qemu-compatible locks on every file opened (default true; qemu's
    /// `file.locking`): a writer excludes other writers and readers that do not share
    /// writes, qemu's processes included, and they exclude it — see
    /// [`blockio::lock`](crate::blockio::lock). Opening a file in conflicting use fails
    /// with [`Error::Locked`](crate::Error::Locked) (`Failed to get "write" lock`).
    pub locking: bool,
    /// Let others write the files while we read them (qemu's `-U` / `force-share=on`):
    /// read-only opens only (a writable open with it is refused, as qemu refuses it).
    pub force_share: bool,
    /// Read and write every file of the chain through this io_uring (qemu's
    /// `aio=io_uring`; Linux): see [`ImageOptions::with_io_uring`]. `None` (the default):
    /// positional system calls on the calling thread.
    #[cfg(target_os = "linux")]
    pub io_uring: Option<Arc<crate::blockio::Uring>>,
    /// Wraps the storages of the top image (see [`StorageHook`]); `None`: none.
    pub storage_hook: Option<StorageHook>,
    /// Filter drivers for nodes inside `json:{…}` backing file names (the CLI's
    /// `blkdebug`); formats, `file` and `raw` (`offset`/`size`) nodes need none.
    pub node_drivers: NodeDrivers,
    /// The nodes between the backing image being opened and its file (from its `json:`
    /// name).
    pub(crate) node: Option<Arc<BackingNode>>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            policy: OpenPolicy::default(),
            limits: Limits::default(),
            open_backing: true,
            backing_writable: false,
            driver_options: OptionList::new(),
            secrets: Secrets::new(),
            cache: CacheMode::Writeback,
            metadata_only: false,
            locking: true,
            force_share: false,
            #[cfg(target_os = "linux")]
            io_uring: None,
            storage_hook: None,
            node_drivers: NodeDrivers::default(),
            node: None,
        }
    }
}

impl ImageOptions {
    /// Defaults with read-only set as given.
    pub fn read_only(ro: bool) -> Self {
        Self {
            read_only: ro,
            ..Self::default()
        }
    }

    /// Sets the open policy.
    pub fn with_policy(mut self, policy: OpenPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`ImageOptions::force_share`] (qemu's `-U`).
    pub fn with_force_share(mut self, force_share: bool) -> Self {
        self.force_share = force_share;
        self
    }

    /// Sets [`ImageOptions::locking`].
    pub fn with_locking(mut self, locking: bool) -> Self {
        self.locking = locking;
        self
    }

    /// Sets whether to open the backing chain.
    pub fn with_backing(mut self, open_backing: bool) -> Self {
        self.open_backing = open_backing;
        self
    }

    /// Sets the secrets (see [`ImageOptions::secrets`]).
    pub fn with_secrets(mut self, secrets: Secrets) -> Self {
        self.secrets = secrets;
        self
    }

    /// Reads and writes every file of the chain through one new io_uring with `depth`
    /// requests in flight at most ([`Uring`](crate::blockio::Uring)): blocking calls from
    /// many threads share it, and [`AsyncDevice`](crate::blockio::AsyncDevice) puts many
    /// reads of one thread in flight. Fails where the kernel has no io_uring.
    #[cfg(target_os = "linux")]
    pub fn with_io_uring(mut self, depth: usize) -> Result<Self> {
        let ring = crate::blockio::Uring::new(depth)
            .map_err(|e| Error::io("could not set up io_uring", e))?;
        self.io_uring = Some(Arc::new(ring));
        Ok(self)
    }

    /// Sets the cache mode (see [`ImageOptions::cache`]).
    pub fn with_cache(mut self, cache: CacheMode) -> Self {
        self.cache = cache;
        self
    }

    /// Sets metadata-only opening (see [`ImageOptions::metadata_only`]).
    pub fn with_metadata_only(mut self, metadata_only: bool) -> Self {
        self.metadata_only = metadata_only;
        self
    }
}

/// The `backing.`-prefixed entries of `o`, without the prefix.
fn backing_options(o: &OptionList) -> OptionList {
    let mut out = OptionList::new();
    for (k, v) in o.entries() {
        if let Some(rest) = k.strip_prefix("backing.") {
            out.set(rest, v);
        }
    }
    out
}

/// An opened image: its device, and the chain below it.
#[derive(Debug, Clone)]
pub struct Image {
    /// The guest view (reads fall through to the backing chain).
    pub device: Arc<dyn BlockDevice>,
    /// Its format.
    pub format: Format,
    /// The path it was opened from.
    pub path: PathBuf,
    /// The file name as the user or the referencing image gave it.
    pub filename: String,
    /// The opened backing image, if any.
    pub backing: Option<Box<Image>>,
    /// The files of this layer locked for it (released by [`Image::close`]).
    locks: HeldLocks,
}

impl Image {
    /// An image of an already opened `device` (a stream, a custom storage): no backing
    /// chain, no file locks held.
    pub fn from_device(
        device: Arc<dyn BlockDevice>,
        format: Format,
        path: PathBuf,
        filename: String,
    ) -> Image {
        Image {
            device,
            format,
            path,
            filename,
            backing: None,
            locks: HeldLocks::default(),
        }
    }

    /// This image and every backing image, top first.
    pub fn chain(&self) -> Vec<&Image> {
        let mut out = vec![self];
        let mut cur = self;
        while let Some(b) = cur.backing.as_deref() {
            out.push(b);
            cur = b;
        }
        out
    }

    /// Closes every writable image of the chain, top first
    /// ([`BlockDevice::close`](crate::BlockDevice::close): qcow2 stores its persistent
    /// dirty bitmaps), returning the first error. Dropping the image closes too, but
    /// silently.
    pub fn close(&self) -> Result<()> {
        let mut first = Ok(());
        for img in self.chain() {
            let r = img.device.close();
            if first.is_ok() {
                first = r;
            }
        }
        // Nothing is written after the close: the files are free for others.
        for img in self.chain() {
            img.locks.release();
        }
        first
    }

    /// The image's host storage size as qemu's "actual-size" reports it.
    pub fn actual_size(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path)
            .ok()
            .map(|m| m.blocks().saturating_mul(512))
    }
}

/// Guesses the format of the file at `path` ([`probe`]).
pub fn probe_path(path: impl AsRef<Path>) -> Result<Format> {
    let s = open_user_file(path.as_ref(), true, CacheMode::Writeback)?;
    Ok(probe(&s))
}

pub(crate) fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Opens the image at `path`, as `format` or probed, with its backing chain as
/// `options.policy` allows.
pub fn open(
    path: impl AsRef<Path>,
    format: Option<Format>,
    options: &ImageOptions,
) -> Result<Image> {
    let path = path.as_ref();
    let naming = Naming {
        filename: &path.to_string_lossy(),
        qemu: path,
    };
    open_inner(
        path,
        naming,
        format,
        options,
        options.read_only,
        options.driver_options.clone(),
        &mut Vec::new(),
    )
}

/// How an image of a chain is named.
#[derive(Clone, Copy)]
struct Naming<'a> {
    /// The name it is shown by ([`Image::filename`]).
    filename: &'a str,
    /// The name qemu knows it by: the user's, or for a backing image, its stored name
    /// combined with its image's (`d/x` for `x` stored in `d/top.qcow2`). Messages name
    /// its own backing file as combined with this (not with the real path it opened).
    qemu: &'a Path,
}

/// qemu's `path_combine`: `name` (stored in the image qemu knows as `image`) as qemu
/// names it, relative to the image's directory as given (`x` beside `top.qcow2`, not
/// `./x`).
fn qemu_combine(image: &Path, name: &str) -> PathBuf {
    match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(name),
        _ => PathBuf::from(name),
    }
}

/// Opens the image at `path` (the user's, when `visited` is empty; otherwise a backing
/// file the policy already resolved to a real path).
fn open_inner(
    path: &Path,
    naming: Naming<'_>,
    format: Option<Format>,
    options: &ImageOptions,
    read_only: bool,
    mut driver_options: OptionList,
    visited: &mut Vec<PathBuf>,
) -> Result<Image> {
    let top = visited.is_empty();
    let canon = enter_chain(path, options, visited)?;
    let lock_mode = LockMode::of(options.locking, options.force_share, read_only)?;
    let file = Arc::new(if top {
        open_user_file(path, read_only, options.cache)?
    } else {
        let kinds = options.policy.special_files;
        open_file_with(
            &canon,
            read_only,
            kinds,
            Some(FilePurpose::Backing),
            options.cache,
        )?
    });
    let format = match format {
        Some(f) => f,
        None => probe(file.as_ref()),
    };
    let locks = HeldLocks::default();
    if let Some(mode) = lock_mode {
        let perms = mode.perms(Some(format), !read_only);
        locks.lock(&file, perms, &path.to_string_lossy())?;
    }
    let hook = options.storage_hook.as_ref().filter(|_| top);
    let mut storage = StorageHook::wrap(hook, None, on_ring(file, options));
    if let Some(node) = options.node.as_ref().filter(|_| !top) {
        storage = node.wrap(storage);
    }
    let dir = dir_of(path);
    let files = Arc::new(PolicyFiles {
        dir: dir.clone(),
        policy: options.policy,
        read_only,
        cache: options.cache,
        #[cfg(target_os = "linux")]
        io_uring: options.io_uring.clone(),
        defer_data_files: options.metadata_only,
        lock_mode,
        locks: locks.clone(),
        hook: hook.cloned(),
        drivers: options.node_drivers.clone(),
        user_options: top,
    });
    let mut open_opts = OpenOptions::new()
        .read_only(read_only)
        .limits(options.limits)
        .files(files);
    let backing_opts = backing_options(&driver_options);
    open_opts.driver_options = std::mem::take(&mut driver_options);
    open_opts.secrets = options.secrets.clone();
    let device = format.driver()?.open(storage, &open_opts)?;

    let mut image = Image {
        device,
        format,
        path: path.to_path_buf(),
        filename: naming.filename.to_string(),
        backing: None,
        locks,
    };
    if options.open_backing {
        open_backing(
            &mut image,
            &dir,
            naming.qemu,
            options,
            backing_opts,
            visited,
        )?;
    }
    Ok(image)
}

/// The storage an image reads through: `file` itself, or `file` on the io_uring of
/// `options` ([`ImageOptions::io_uring`]).
fn on_ring(file: Arc<diskimg_blockio::FileStorage>, options: &ImageOptions) -> Arc<dyn Storage> {
    #[cfg(target_os = "linux")]
    if let Some(ring) = &options.io_uring {
        return Arc::new(diskimg_blockio::UringStorage::from_arc(file, ring.clone()));
    }
    let _ = options;
    file
}

/// Checks that `path` does not close a loop and that the chain stays within the depth
/// limits, then records it in `visited`; returns its canonical path.
fn enter_chain(path: &Path, options: &ImageOptions, visited: &mut Vec<PathBuf>) -> Result<PathBuf> {
    let canon = std::fs::canonicalize(path)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    if visited.contains(&canon) {
        return Err(Error::BackingLoop {
            path: path.display().to_string(),
        });
    }
    let depth = u32::try_from(visited.len()).unwrap_or(u32::MAX);
    let max_depth = options
        .policy
        .max_chain_depth
        .min(options.limits.max_chain_depth);
    if depth > max_depth {
        return Err(Error::LimitExceeded {
            what: "backing chain depth",
            requested: u64::from(depth),
            limit: u64::from(max_depth),
        });
    }
    visited.push(canon.clone());
    Ok(canon)
}

/// Opens the backing file `image` names (trying its alternate names in turn, as the
/// policy allows) and attaches it. Nothing to do for an image without one. `qemu`: the
/// name qemu knows the image by ([`Naming::qemu`]).
fn open_backing(
    image: &mut Image,
    dir: &Path,
    qemu: &Path,
    options: &ImageOptions,
    mut backing_opts: OptionList,
    visited: &mut Vec<PathBuf>,
) -> Result<()> {
    // qemu's `backing.driver=FMT`: the backing image's format, over what the image names.
    let backing_driver = backing_opts.take("driver");
    let Some(bref) = image.device.info().backing else {
        return Ok(());
    };
    if bref.filename.is_empty() {
        return Ok(());
    }
    let bformat = match backing_driver.as_deref().or(bref.format.as_deref()) {
        // qemu's wording for a backing format it has no driver for.
        Some(f) if !f.is_empty() => Some(Format::from_name(f).map_err(|_| {
            Error::invalid(format!("Could not open backing file: Unknown driver '{f}'"))
        })?),
        _ => None,
    };
    let (mut last_err, mut refused) = (None, None);
    for name in std::iter::once(&bref.filename).chain(bref.alternates.iter()) {
        // A `json:{…}` name: the format on the file (and nodes) it names.
        let node = match name.starts_with("json:") {
            true => match backing_node(name, &options.node_drivers) {
                Ok(n) => Some(Arc::new(n)),
                // A policy that refuses backing files says so first.
                Err(e) => {
                    last_err = Some(
                        match options.policy.resolve(FilePurpose::Backing, dir, name) {
                            Err(d @ Error::BackingDenied { .. }) => d,
                            _ => e,
                        },
                    );
                    continue;
                }
            },
            false => None,
        };
        let mut file = node.as_ref().map_or(name.clone(), |n| n.path.clone());
        let qemu_names = options.policy.backing == crate::PathRule::Any && node.is_none();
        // As qemu: a stored `foo:bar` names a protocol, not a file beside the image, and
        // `file:F` names F as given (a relative one against the working directory).
        let (mut dir, mut shown) = (dir, name.clone());
        let mut qemu_name = qemu_combine(qemu, &file);
        if qemu_names && let Some(path) = crate::file_protocol_path(&file) {
            dir = Path::new(".");
            // qemu names it as its file driver does (`./foo:bar` for `file:foo:bar`).
            file = file.split_off("file:".len());
            qemu_name = PathBuf::from(&path);
            shown = path;
        } else if qemu_names && let Some(p) = crate::protocol_of(&file) {
            last_err = Some(Error::invalid(format!(
                "Could not open backing file: {}",
                crate::protocol_refusal(p)
            )));
            continue;
        }
        let bformat = node.as_ref().and_then(|n| n.format).or(bformat);
        let mut opts = backing_opts.clone();
        for (k, v) in node.iter().flat_map(|n| n.driver_options.entries()) {
            opts.set(k, v);
        }
        let node_options = ImageOptions {
            node,
            ..options.clone()
        };
        // Judged by the real path it resolves to (symbolic links followed) and its type.
        let bpath = match options.policy.resolve(FilePurpose::Backing, dir, &file) {
            Ok(p) => p,
            Err(e @ Error::BackingDenied { .. }) => {
                last_err = Some(e);
                continue;
            }
            Err(_) => {
                // qemu's wording: "Could not open backing file: Could not open 'F': No
                // such file or directory".
                last_err = Some(Error::io(
                    format!(
                        "Could not open backing file: Could not open '{}'",
                        qemu_name.display()
                    ),
                    std::io::Error::from_raw_os_error(2),
                ));
                continue;
            }
        };
        let depth_before = visited.len();
        let naming = Naming {
            filename: &shown,
            qemu: &qemu_name,
        };
        let backing = open_inner(
            &bpath,
            naming,
            bformat,
            &node_options,
            !options.backing_writable,
            opts,
            visited,
        )
        .map_err(nested_backing_error)?;
        // A candidate the image refuses as its parent (VHD unique id, VHDX linkage) does
        // not end the search: another locator may name the right file.
        if let Err(e) = image.device.set_backing(Some(backing.device.clone())) {
            visited.truncate(depth_before);
            refused.get_or_insert(e);
            continue;
        }
        image.backing = Some(Box::new(backing));
        return Ok(());
    }
    // A file that was found but refused says more than the names that were not found.
    Err(refused
        .or(last_err)
        .unwrap_or_else(|| Error::invalid("backing file could not be opened")))
}

/// qemu prefixes every level of a chain that fails below it: `Could not open backing
/// file: Could not open backing file: Could not open 'b.raw': No such file or directory`
/// for a missing file two levels down.
fn nested_backing_error(e: Error) -> Error {
    match e {
        Error::Io { context, source } if context.starts_with("Could not open backing file: ") => {
            Error::io(format!("Could not open backing file: {context}"), source)
        }
        e => e,
    }
}

/// Opens an image held in any [`Storage`] (memory, a custom transport). No backing
/// chain is followed and no other host file can be reached.
pub fn open_storage(
    storage: Arc<dyn Storage>,
    format: Option<Format>,
    read_only: bool,
) -> Result<Arc<dyn BlockDevice>> {
    let format = match format {
        Some(f) => f,
        None => probe(storage.as_ref()),
    };
    format
        .driver()?
        .open(storage, &OpenOptions::new().read_only(read_only))
}
