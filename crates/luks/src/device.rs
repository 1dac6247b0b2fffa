//! The standalone `luks` format (qemu's `block/crypto.c`): a LUKS1 header area at offset 0
//! (phdr and key material, `payloadOffset` sectors long) followed by the guest data,
//! encrypted per 512-byte sector with the guest sector number as IV. The virtual size is
//! the file length after the payload offset.
//!
//! The passphrase comes from the driver option `key-secret=ID` (qemu's name) looked up in
//! [`OpenOptions::secrets`]; with `encrypt.no-io=on` (diskimg's metadata-only open, as
//! qemu's `BDRV_O_NO_IO` for `qemu-img info`) the image opens without a key and every data
//! access fails.

use std::any::Any;
use std::sync::{Arc, Mutex};

use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, DeviceInfo, Driver, Error, Extent, ExtentKind,
    OpenOptions, Preallocation, Result, Storage, check_range,
};

use crate::header::{MAGIC, PHDR_LEN};
use crate::{LuksHeader, SECTOR, SectorCipher, info_entries, new_area};

/// The open option naming the secret with the passphrase (qemu's name).
pub const KEY_SECRET: &str = "key-secret";
/// diskimg's metadata-only open (shared with qcow2's `encrypt.no-io`).
const NO_IO: &str = "encrypt.no-io";
const SEC: u64 = SECTOR as u64;

fn required() -> Error {
    Error::Key("Parameter 'key-secret' is required for cipher".into())
}

fn idx(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid("luks request too large"))
}

/// An open `luks` image.
pub struct LuksDevice {
    storage: Arc<dyn Storage>,
    header: LuksHeader,
    /// `None`: opened without a key (metadata only).
    cipher: Option<SectorCipher>,
    /// Byte offset of the guest data in the file.
    payload: u64,
    /// Virtual size; changes with `resize`.
    size: Mutex<u64>,
    read_only: bool,
    /// Serialises read-modify-write of partly covered sectors.
    rmw: Mutex<()>,
}

impl std::fmt::Debug for LuksDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksDevice")
            .field("payload", &self.payload)
            .field("unlocked", &self.cipher.is_some())
            .finish_non_exhaustive()
    }
}

impl LuksDevice {
    /// Opens the image in `storage`, unlocking it with the secret the options name.
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        let file_len = storage.len()?;
        if file_len < PHDR_LEN as u64 {
            return Err(Error::corrupt(
                "luks",
                "file too short for a LUKS header",
                0,
            ));
        }
        let mut phdr = vec![0u8; PHDR_LEN];
        storage.read_exact_at(&mut phdr, 0)?;
        let header = LuksHeader::parse(&phdr)?;
        let payload = u64::from(header.payload_offset) * SEC;
        if payload > file_len {
            return Err(Error::corrupt(
                "luks",
                "LUKS payload offset beyond the end of the file",
                0,
            ));
        }
        let id = opts.driver_options.get(KEY_SECRET);
        let cipher = match id {
            None if opts.driver_options.get(NO_IO) == Some("on") => None,
            None => return Err(required()),
            Some(id) => {
                let pass = opts.secrets.require(id)?;
                let read = |o: u64, n: usize| -> Result<Vec<u8>> {
                    let end =
                        o.checked_add(n as u64)
                            .filter(|&e| e <= payload)
                            .ok_or(Error::corrupt(
                                "luks",
                                "LUKS key material beyond the payload offset",
                                o,
                            ))?;
                    let mut b = vec![0u8; idx(end - o)?];
                    storage.read_exact_at(&mut b, o)?;
                    Ok(b)
                };
                let (mk, _) = header.unlock(pass, &read)?;
                Some(header.data_cipher(&mk)?)
            }
        };
        Ok(Self {
            size: Mutex::new(file_len - payload),
            storage,
            header,
            cipher,
            payload,
            read_only: opts.read_only,
            rmw: Mutex::new(()),
        })
    }

    /// The parsed LUKS header.
    pub fn header(&self) -> &LuksHeader {
        &self.header
    }

    fn size(&self) -> u64 {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher.as_ref().ok_or_else(required)
    }

    /// Reads and decrypts whole sectors `start..start+buf.len()` (sector aligned).
    fn read_sectors(&self, buf: &mut [u8], start: u64) -> Result<()> {
        self.storage.read_exact_at(buf, self.payload + start)?;
        self.cipher()?.decrypt(buf, start / SEC)
    }
}

impl BlockDevice for LuksDevice {
    fn info(&self) -> DeviceInfo {
        let mut i = DeviceInfo::new("luks", self.size());
        i.read_only = self.read_only;
        i.encrypted = true;
        i.format_specific = Some(("luks", info_entries(&self.header)));
        i
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        let len = buf.len() as u64;
        if offset.is_multiple_of(SEC) && len.is_multiple_of(SEC) {
            return self.read_sectors(buf, offset);
        }
        let start = offset - offset % SEC;
        let end = (offset + len).next_multiple_of(SEC);
        let mut b = vec![0u8; idx(end - start)?];
        self.read_sectors(&mut b, start)?;
        let from = idx(offset - start)?;
        let part = b
            .get(from..from + buf.len())
            .ok_or(Error::internal("luks read range"))?;
        buf.copy_from_slice(part);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size())?;
        let cipher = self.cipher()?;
        let len = buf.len() as u64;
        let start = offset - offset % SEC;
        let end = (offset + len).next_multiple_of(SEC);
        let mut b = vec![0u8; idx(end - start)?];
        let partial = start != offset || end != offset + len;
        let _guard = partial.then(|| self.rmw.lock().unwrap_or_else(|e| e.into_inner()));
        if start != offset {
            let head = b.get_mut(..SECTOR).ok_or(Error::internal("luks write"))?;
            self.read_sectors(head, start)?;
        }
        if end != offset + len && (start == offset || end - start > SEC) {
            let t = idx(end - start - SEC)?;
            let tail = b.get_mut(t..).ok_or(Error::internal("luks write"))?;
            self.read_sectors(tail, end - SEC)?;
        }
        let from = idx(offset - start)?;
        b.get_mut(from..from + buf.len())
            .ok_or(Error::internal("luks write range"))?
            .copy_from_slice(buf);
        cipher.encrypt(&mut b, start / SEC)?;
        self.storage.write_all_at(&b, self.payload + start)
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size())?;
        // Every byte is ciphertext: data, with no plain host offset (as qemu reports it).
        Ok(Extent {
            offset,
            len,
            kind: ExtentKind::Data { offset: None },
        })
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if new_size < *size && !shrink {
            return Err(Error::invalid("shrinking needs shrink"));
        }
        let end = self
            .payload
            .checked_add(new_size)
            .ok_or(Error::invalid("size too large"))?;
        let old_end = self.payload + *size;
        self.storage.set_len(end)?;
        if end > old_end && prealloc != Preallocation::Off {
            self.storage.preallocate(old_end, end - old_end, prealloc)?;
        }
        *size = new_size;
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The `luks` driver.
#[derive(Debug, Clone, Copy)]
pub struct LuksDriver;

/// The driver the facade registers.
pub static DRIVER: LuksDriver = LuksDriver;

static CREATE_OPTIONS: &[CreateOptionSpec] = &[
    CreateOptionSpec {
        name: "cipher-alg",
        kind: "<str>",
        help: "Name of encryption cipher algorithm",
    },
    CreateOptionSpec {
        name: "cipher-mode",
        kind: "<str>",
        help: "Name of encryption cipher mode",
    },
    CreateOptionSpec {
        name: "detached-header",
        kind: "<bool (on/off)>",
        help: "Create a detached LUKS header",
    },
    CreateOptionSpec {
        name: "hash-alg",
        kind: "<str>",
        help: "Name of encryption hash algorithm",
    },
    CreateOptionSpec {
        name: "iter-time",
        kind: "<num>",
        help: "Time to spend in PBKDF in milliseconds",
    },
    CreateOptionSpec {
        name: "ivgen-alg",
        kind: "<str>",
        help: "Name of IV generator algorithm",
    },
    CreateOptionSpec {
        name: "ivgen-hash-alg",
        kind: "<str>",
        help: "Name of IV generator hash algorithm",
    },
    CreateOptionSpec {
        name: "key-secret",
        kind: "<str>",
        help: "ID of secret providing LUKS passphrase",
    },
    CreateOptionSpec {
        name: "size",
        kind: "<size>",
        help: "Virtual disk size",
    },
];

impl Driver for LuksDriver {
    fn name(&self) -> &'static str {
        "luks"
    }

    fn probe(&self, storage: &dyn Storage) -> u32 {
        let mut m = [0u8; 6];
        match storage.read_exact_at(&mut m, 0) {
            Ok(()) if m == MAGIC => 100,
            _ => 0,
        }
    }

    fn open(&self, storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(LuksDevice::open(storage, opts)?))
    }

    fn create(&self, storage: Arc<dyn Storage>, req: &mut CreateRequest) -> Result<()> {
        let o = &mut req.options;
        if o.take_bool("detached-header")? == Some(true) {
            return Err(Error::unsupported("luks", "detached LUKS headers"));
        }
        let id = o.take(KEY_SECRET).ok_or_else(required)?;
        let pass = req.secrets.require(&id)?;
        let (header, area) = new_area(o, "", pass)?;
        let payload = u64::from(header.payload_offset) * SEC;
        let size = req.size.next_multiple_of(SEC);
        storage.write_all_at(&area, 0)?;
        storage.set_len(
            payload
                .checked_add(size)
                .ok_or(Error::invalid("size too large"))?,
        )?;
        storage.flush()
    }

    fn create_options(&self) -> &'static [CreateOptionSpec] {
        CREATE_OPTIONS
    }
}
