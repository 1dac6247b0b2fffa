//! Export any [`BlockDevice`](diskimg_blockio::BlockDevice) to other processes: over NBD
//! (what qemu-nbd does) and over vhost-user-blk (what qemu-storage-daemon does).
//!
//! - [`Export`]: one device with the policy between client requests and the device
//!   (qemu-nbd's `--discard`, `--detect-zeroes`, `--cache`, read-only), and the
//!   protocol's error vocabulary ([`Fault`]).
//! - [`NbdServer`]: fixed newstyle NBD with structured replies, `NBD_OPT_GO`/`INFO`/
//!   `LIST`, metadata contexts `base:allocation` and `qemu:allocation-depth`, multi-conn,
//!   READ, WRITE (+FUA), FLUSH, TRIM, CACHE, WRITE_ZEROES (+NO_HOLE, FAST_ZERO) and
//!   BLOCK_STATUS. See `docs/serve.md` for the subset and the error choices.
//! - [`serve_vhost_user_blk`]: the export as a vhost-user-blk device (rust-vmm's
//!   `vhost-user-backend`, `virtio-queue`, `vm-memory`): several queues served in
//!   parallel, flush, discard and write-zeroes, read-only mode ([`VhostConfig`]).
//! - [`Listener`]/[`Stream`]: TCP or unix sockets, bound here or passed by systemd
//!   socket activation ([`Listener::activated`]); [`Shutdown`]: stops a server
//!   cleanly (requests in flight finish, the export is flushed).
//!
//! A Rust program can export a device it built itself; the `diskimg serve` command is
//! this crate plus the facade's image opening.
//!
//! # Example
//!
//! A raw device in memory, served on a unix socket until the client leaves:
//!
//! ```
//! use std::sync::Arc;
//! use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage};
//! use diskimg_serve::{Export, ExportOptions, Listener, NbdConfig, NbdServer, Shutdown};
//!
//! let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
//! diskimg_raw::DRIVER.create(storage.clone(), &mut CreateRequest::new(1 << 20, OptionList::new()))?;
//! let device = diskimg_raw::DRIVER.open(storage, &OpenOptions::new())?;
//! let export = Arc::new(Export::new(device, ExportOptions::named("disk")));
//!
//! let dir = tempfile::tempdir()?;
//! let listener = Listener::unix(dir.path().join("nbd.sock"))?;
//! let shutdown = Shutdown::new();
//! let server = NbdServer::new(export, NbdConfig::default());
//! // A real program runs this until a signal triggers `shutdown`; here nobody connects,
//! // so stop at once.
//! shutdown.trigger();
//! server.serve(&listener, &shutdown)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod activation;
mod export;
mod listen;
mod nbd;
mod vhost;

pub use export::{CacheMode, DetectZeroes, Discard, Export, ExportOptions, Fault, WritePolicy};
pub use listen::{Listener, Shutdown, Stream};
pub use nbd::{NbdConfig, NbdServer};
pub use vhost::{VhostConfig, serve_vhost_user_blk};
