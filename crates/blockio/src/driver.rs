//! The format-driver interface the facade dispatches through, and the policy object
//! through which drivers reach other host files.

use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::options::{CreateOptionSpec, OptionList};
use crate::secrets::Secrets;
use crate::storage::Storage;

/// Why a driver wants another host file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilePurpose {
    /// A backing (parent) image read at create time, e.g. to copy a VHD/VHDX parent's
    /// identity into a new differencing image.
    Backing,
    /// An external data file (qcow2 `data_file`).
    DataFile,
    /// An extent of a multi-file image (VMDK).
    Extent,
}

impl FilePurpose {
    /// A short description for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            FilePurpose::Backing => "backing file",
            FilePurpose::DataFile => "data file",
            FilePurpose::Extent => "extent file",
        }
    }
}

/// Opens and creates the other host files an image names (data files, VMDK extents).
///
/// Format crates never touch the file system: they ask this object, which applies the
/// caller's policy. Names are exactly as stored in the image; the implementation
/// resolves them (normally relative to the image's directory) and may refuse.
/// Backing images are not opened here: the facade opens them as devices and connects
/// them with [`BlockDevice::set_backing`].
pub trait HostFiles: Send + Sync + std::fmt::Debug {
    /// Opens an existing file named by the image.
    fn open(&self, name: &str, purpose: FilePurpose, writable: bool) -> Result<Arc<dyn Storage>>;
    /// Creates (or truncates) a file the image will name.
    fn create(&self, name: &str, purpose: FilePurpose) -> Result<Arc<dyn Storage>>;
    /// Opens a file the caller named in the open options instead of the one the image
    /// names (qemu's `data-file.filename`). By default it is judged as a name the image
    /// stores ([`HostFiles::open`]); a host that knows the options came from its user
    /// opens it as given.
    fn open_given(
        &self,
        name: &str,
        purpose: FilePurpose,
        writable: bool,
    ) -> Result<Arc<dyn Storage>> {
        self.open(name, purpose, writable)
    }
}

/// The default [`HostFiles`]: refuses every other file.
#[derive(Clone, Copy, Debug, Default)]
pub struct DenyFiles;

impl HostFiles for DenyFiles {
    fn open(&self, name: &str, purpose: FilePurpose, _writable: bool) -> Result<Arc<dyn Storage>> {
        Err(Error::BackingDenied {
            path: name.to_string(),
            purpose: purpose.as_str(),
            reason: "the open policy allows no other host files",
        })
    }
    fn create(&self, name: &str, purpose: FilePurpose) -> Result<Arc<dyn Storage>> {
        self.open(name, purpose, true)
    }
}

/// How a driver should open an image.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Resource bounds.
    pub limits: Limits,
    /// Access to other host files named by the image.
    pub files: Arc<dyn HostFiles>,
    /// Runtime options for the driver (qemu `--image-opts` keys without the `driver=` part,
    /// e.g. `force_size_calc=chs` for vpc). Drivers read the keys they know; keys no
    /// driver understands are ignored (the CLI validates `--image-opts` itself).
    pub driver_options: OptionList,
    /// Secrets the driver options refer to by id (qcow2 `encrypt.key-secret=ID`).
    pub secrets: Secrets,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            limits: Limits::default(),
            files: Arc::new(DenyFiles),
            driver_options: OptionList::new(),
            secrets: Secrets::new(),
        }
    }
}

impl OpenOptions {
    /// Read-write with default limits and no access to other files.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets read-only.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }
    /// Sets the limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
    /// Sets the host-file policy.
    pub fn files(mut self, files: Arc<dyn HostFiles>) -> Self {
        self.files = files;
        self
    }
    /// Sets the secrets (see [`OpenOptions::secrets`]).
    pub fn secrets(mut self, secrets: Secrets) -> Self {
        self.secrets = secrets;
        self
    }
    /// Sets one driver option (`key=value`, as in qemu's `--image-opts`).
    pub fn driver_option(mut self, key: &str, value: &str) -> Self {
        self.driver_options.set(key, value);
        self
    }
}

/// What to create.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CreateRequest {
    /// Virtual size in bytes.
    pub size: u64,
    /// Format options (qemu `-o`), including `backing_file`/`backing_fmt` when given.
    /// The driver takes what it understands; leftovers are refused by the facade.
    pub options: OptionList,
    /// Access to other host files (extents, data files) the new image needs.
    pub files: Arc<dyn HostFiles>,
    /// Resource bounds.
    pub limits: Limits,
    /// The new image's own file name (no directory), when known. Formats that name
    /// companion files after the image (VMDK extents `NAME-flat.vmdk`, `NAME-s001.vmdk`)
    /// derive them from it; without it they use a generic name.
    pub image_name: Option<String>,
    /// The absolute directory of the new image, when known. Formats that record a parent
    /// both by relative and by absolute path (VHD's W2ru/W2ku locators, VHDX's
    /// `relative_path`/`absolute_win32_path`) derive the form the user did not give from it.
    pub image_dir: Option<std::path::PathBuf>,
    /// Secrets the options refer to by id (qcow2 `encrypt.key-secret=ID`).
    pub secrets: Secrets,
}

impl CreateRequest {
    /// A request for `size` bytes with `options`, allowed no other host files.
    pub fn new(size: u64, options: OptionList) -> Self {
        Self {
            size,
            options,
            files: Arc::new(DenyFiles),
            limits: Limits::default(),
            image_name: None,
            image_dir: None,
            secrets: Secrets::new(),
        }
    }
    /// Sets the image's own file name (see [`CreateRequest::image_name`]).
    pub fn image_name(mut self, name: impl Into<String>) -> Self {
        self.image_name = Some(name.into());
        self
    }
    /// Sets the image's absolute directory (see [`CreateRequest::image_dir`]).
    pub fn image_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.image_dir = Some(dir.into());
        self
    }
    /// Sets the host-file policy.
    pub fn files(mut self, files: Arc<dyn HostFiles>) -> Self {
        self.files = files;
        self
    }
    /// Sets the secrets (see [`CreateRequest::secrets`]).
    pub fn secrets(mut self, secrets: Secrets) -> Self {
        self.secrets = secrets;
        self
    }
}

/// One image format: probing, opening and creating.
///
/// Each format crate exports one static implementing this; the facade keeps a table of them.
pub trait Driver: Send + Sync {
    /// qemu's name for the format (`qcow2`, `vpc`, …).
    fn name(&self) -> &'static str;

    /// How sure the driver is that `storage` holds its format: 0 = not this format,
    /// 100 = certain (magic and checksum). Must not fail on short or hostile input.
    fn probe(&self, storage: &dyn Storage) -> u32;

    /// Opens an image on `storage`.
    fn open(
        &self,
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDevice>>;

    /// Writes a new, empty image of `request.size` bytes to the (empty) `storage`.
    /// Must consume the options it understands from `request.options`.
    fn create(&self, storage: Arc<dyn Storage>, request: &mut CreateRequest) -> Result<()>;

    /// The create options understood, for `create -o help`.
    fn create_options(&self) -> &'static [CreateOptionSpec] {
        &[]
    }
}
