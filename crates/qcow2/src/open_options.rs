//! The qcow2 driver options, typed ([`Qcow2OpenOptions`]): what
//! [`OpenOptions::driver_options`] carries as qemu-style strings (`check=on`,
//! `x-bitmap-edit=on`, `x-deferred-tables=on`, `x-write-behind=off`, `encrypt.key-secret=ID`,
//! `encrypt.no-io=on`, `snapshot.id=`,
//! `snapshot.name=`, `pass-discard-snapshot=off`), read in one place ([`Qcow2OpenOptions::from_options`]).

use diskimg_blockio::OpenOptions;

/// The driver option naming the secret that holds the passphrase (qemu's name).
pub const KEY_SECRET_OPTION: &str = "encrypt.key-secret";
/// Driver option (diskimg's own): open an encrypted image without a key for metadata
/// only (`info`, as qemu's `BDRV_O_NO_IO`); every data read or write then fails.
pub const NO_IO_OPTION: &str = "encrypt.no-io";

/// How a qcow2 image is opened beyond the generic [`OpenOptions`].
///
/// ```
/// use std::sync::Arc;
/// use diskimg_blockio::{BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions,
///                       OptionList, Storage};
/// use diskimg_qcow2::{Qcow2Device, Qcow2OpenOptions};
///
/// let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// diskimg_qcow2::DRIVER.create(storage.clone(), &mut CreateRequest::new(1 << 20, OptionList::new()))?;
/// // The same as the driver option `check=on`.
/// let typed = Qcow2OpenOptions::new().check(true);
/// let dev = Qcow2Device::open_with(storage, &OpenOptions::new(), &typed)?;
/// assert_eq!(dev.virtual_size(), 1 << 20);
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Qcow2OpenOptions {
    /// `check=on` (qemu's `BDRV_O_CHECK`): opened for `check -r`, which repairs what a
    /// normal read-write open would refuse (the corrupt bit, incompatible feature bit 1)
    /// or repair by itself (a dirty image, incompatible bit 0).
    pub check: bool,
    /// `x-bitmap-edit=on` (diskimg's own): opened to edit persistent bitmaps (the
    /// bitmaps extension, 0x23852875) as metadata only; no bitmap tracks writes.
    pub bitmap_edit: bool,
    /// `encrypt.key-secret` ([`KEY_SECRET_OPTION`]): the id of the secret in
    /// [`OpenOptions::secrets`] holding an encrypted image's passphrase.
    pub key_secret: Option<String>,
    /// `encrypt.no-io=on` ([`NO_IO_OPTION`], diskimg's own): open an encrypted image
    /// without a key for metadata only, as qemu's `BDRV_O_NO_IO`.
    pub no_io: bool,
    /// `snapshot.id`: open a read-only view of the internal snapshot with this id.
    pub snapshot_id: Option<String>,
    /// `snapshot.name`: open a read-only view of the internal snapshot with this name.
    pub snapshot_name: Option<String>,
    /// qemu's overlap check of inactive L2 tables (`overlap-check.inactive-l2=on`, or
    /// `overlap-check=all`): it reads every snapshot's L1 table, so with a snapshot whose
    /// L1 table cannot be used, every write fails as in qemu.
    pub inactive_l2_check: bool,
    /// `data-file.filename` (with `data-file.driver` absent or `file`): the external data
    /// file to open instead of the one the image names (qemu's `data-file` child),
    /// through [`HostFiles::open_given`](diskimg_blockio::HostFiles::open_given).
    pub data_file: Option<String>,
    /// `x-deferred-tables=on` (diskimg's own): a new L2 table is written with the other
    /// deferred metadata at the next flush (or when the cache's dirty tables reach their
    /// bound), one storage flush for all new tables since the last, instead of one flush
    /// per table before its L1 entry (qemu's order). Crash consistent either way (a crash
    /// leaks the unwritten tables' clusters); for an image being filled in bulk (`convert
    /// -t none` targets). Off: qemu's order, which its blkdebug events follow.
    pub deferred_tables: bool,
    /// `x-write-behind=off` (diskimg's own): small writes into fresh clusters are not
    /// handed to the page cache's write-back early (see the crate's `behind` module; on
    /// by default: a flush after many allocating writes then waits less). For A/B
    /// measurements (`benches/engine.sh`).
    pub no_write_behind: bool,
    /// `pass-discard-snapshot=off` (qemu's runtime option): the clusters snapshot
    /// operations free (`snapshot -d`/`-a`, old snapshot tables) are not discarded in the
    /// image file, so their old contents stay there (qemu's default, `on`, punches them).
    pub keep_snapshot_frees: bool,
}

impl Qcow2OpenOptions {
    /// Nothing beyond [`OpenOptions`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the driver options of `o` (unknown keys are ignored, as before).
    pub fn from_options(o: &OpenOptions) -> Self {
        let d = &o.driver_options;
        let on = |k: &str| d.get(k) == Some("on");
        let s = |k: &str| d.get(k).map(str::to_string);
        Self {
            check: on("check"),
            bitmap_edit: on("x-bitmap-edit"),
            deferred_tables: on("x-deferred-tables"),
            no_write_behind: d.get("x-write-behind") == Some("off"),
            keep_snapshot_frees: d.get("pass-discard-snapshot") == Some("off"),
            key_secret: s(KEY_SECRET_OPTION),
            no_io: on(NO_IO_OPTION),
            snapshot_id: s("snapshot.id"),
            snapshot_name: s("snapshot.name"),
            inactive_l2_check: match d.get("overlap-check.inactive-l2") {
                Some(v) => v == "on",
                None => d.get("overlap-check").or(d.get("overlap-check.template")) == Some("all"),
            },
            data_file: match d.get("data-file.driver") {
                None | Some("file") => s("data-file.filename"),
                Some(_) => None,
            },
        }
    }

    /// Sets [`Qcow2OpenOptions::check`].
    pub fn check(mut self, on: bool) -> Self {
        self.check = on;
        self
    }

    /// Sets [`Qcow2OpenOptions::bitmap_edit`].
    pub fn bitmap_edit(mut self, on: bool) -> Self {
        self.bitmap_edit = on;
        self
    }

    /// Sets [`Qcow2OpenOptions::deferred_tables`].
    pub fn deferred_tables(mut self, on: bool) -> Self {
        self.deferred_tables = on;
        self
    }

    /// Sets [`Qcow2OpenOptions::key_secret`].
    pub fn key_secret(mut self, id: impl Into<String>) -> Self {
        self.key_secret = Some(id.into());
        self
    }

    /// Sets [`Qcow2OpenOptions::no_io`].
    pub fn no_io(mut self, on: bool) -> Self {
        self.no_io = on;
        self
    }

    /// Sets [`Qcow2OpenOptions::snapshot_id`].
    pub fn snapshot_id(mut self, id: impl Into<String>) -> Self {
        self.snapshot_id = Some(id.into());
        self
    }

    /// Sets [`Qcow2OpenOptions::snapshot_name`].
    pub fn snapshot_name(mut self, name: impl Into<String>) -> Self {
        self.snapshot_name = Some(name.into());
        self
    }

    /// Whether a snapshot view is asked for.
    pub(crate) fn snapshot_view(&self) -> bool {
        self.snapshot_id.is_some() || self.snapshot_name.is_some()
    }
}
