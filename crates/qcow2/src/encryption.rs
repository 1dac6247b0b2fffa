//! Encrypted qcow2 images at run time: unlocking at open and per-sector encryption of
//! guest data clusters (qcow2 spec, "Full disk encryption header pointer" and
//! `crypt_method`).
//!
//! - `crypt_method` 2 (LUKS): the LUKS1 header lives in the clusters named by the
//!   0x0537be77 header extension; data sectors use the *host* offset / 512 as IV sector.
//! - `crypt_method` 1 (legacy AES): AES-128-CBC keyed by the passphrase, IV sector =
//!   *guest* offset / 512. Insecure; supported for compatibility, with a warning.
//!
//! The key comes from the driver option `encrypt.key-secret=ID` looked up in
//! [`OpenOptions::secrets`](diskimg_blockio::OpenOptions::secrets), as in qemu. Secret material never reaches an error message.

use std::sync::Mutex;

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{DebugEvent, Error, InfoValue, Result, Secrets, Storage};
use zeroize::Zeroizing;

use crate::crypto::{LuksHeader, SectorCipher, legacy_aes};
use crate::disk::header::{CRYPT_METHOD_AT, Header};
use crate::engine::meta::read_host;
use crate::errors::internal;
use crate::open_options::Qcow2OpenOptions;

/// `crypt_method` for legacy AES.
pub(crate) const CRYPT_AES: u32 = 1;
/// `crypt_method` for LUKS.
pub(crate) const CRYPT_LUKS: u32 = 2;

const SECTOR: u64 = 512;

/// The data cipher of an unlocked image.
pub(crate) struct Encryption {
    /// LUKS (host-offset IVs) or legacy AES (guest-offset IVs).
    luks: bool,
    /// `None`: opened without a key (metadata only).
    cipher: Option<SectorCipher>,
    /// The parsed LUKS header (for `info` and key-slot changes).
    pub(crate) header: Mutex<Option<LuksHeader>>,
    /// The LUKS master key (for adding key slots).
    pub(crate) master_key: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encryption")
            .field("luks", &self.luks)
            .field("unlocked", &self.cipher.is_some())
            .finish_non_exhaustive()
    }
}

fn idx(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| internal("encrypted I/O size"))
}

impl Encryption {
    /// Unlocks the image described by `h` on `file`; `None` for unencrypted images.
    pub(crate) fn open(
        file: &dyn Storage,
        h: &Header,
        q: &Qcow2OpenOptions,
        secrets: &Secrets,
    ) -> Result<Option<Self>> {
        if h.crypt_method == 0 {
            return Ok(None);
        }
        let luks = h.crypt_method == CRYPT_LUKS;
        let header = if luks {
            let (off, len) = h.ext.crypto.ok_or(Error::corrupt(
                "qcow2",
                "Missing CRYPTO header for crypt method 2",
                CRYPT_METHOD_AT,
            ))?;
            let file_len = file.len()?;
            if len < 592 || off.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(Error::corrupt(
                    "qcow2",
                    "LUKS header area beyond the end of the file",
                    off,
                ));
            }
            let mut phdr = vec![0u8; 592];
            file.read_exact_at(&mut phdr, off)?;
            Some((LuksHeader::parse(&phdr)?, off, len))
        } else {
            None
        };
        let id = q.key_secret.as_deref();
        let no_io = q.no_io;
        let Some(id) = id else {
            if no_io {
                return Ok(Some(Self {
                    luks,
                    cipher: None,
                    header: Mutex::new(header.map(|x| x.0)),
                    master_key: None,
                }));
            }
            return Err(Error::Key(
                "Parameter 'encrypt.key-secret' is required for cipher".into(),
            ));
        };
        let pass = secrets.require(id)?;
        let mut master_key = None;
        let cipher = match &header {
            Some((hdr, off, len)) => {
                let read =
                    |o: u64, n: usize| -> Result<Vec<u8>> {
                        let end = o.checked_add(n as u64).filter(|&e| e <= *len).ok_or(
                            Error::corrupt("qcow2", "LUKS key material beyond the header area", o),
                        )?;
                        let mut b = vec![0u8; idx(end - o)?];
                        file.read_exact_at(&mut b, off + o)?;
                        Ok(b)
                    };
                let (mk, _) = hdr.unlock(pass, &read)?;
                let c = hdr.data_cipher(&mk)?;
                master_key = Some(mk);
                c
            }
            None => legacy_aes(pass)?,
        };
        Ok(Some(Self {
            luks,
            cipher: Some(cipher),
            header: Mutex::new(header.map(|x| x.0)),
            master_key,
        }))
    }

    /// The `encrypt` entry of `qemu-img info`'s format-specific data: the LUKS header's
    /// entries with `format: luks` before `cipher-mode` (qemu's order), or `format: aes`.
    pub(crate) fn info(&self) -> InfoValue {
        let guard = self.header.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = guard.as_ref().filter(|_| self.luks) else {
            return InfoValue::Map(vec![("format".into(), InfoValue::Str("aes".into()))]);
        };
        let mut m = crate::crypto::info_entries(h);
        let at = m
            .iter()
            .position(|(k, _)| k == "cipher-mode")
            .unwrap_or(m.len());
        m.insert(at, ("format".into(), InfoValue::Str("luks".into())));
        InfoValue::Map(m)
    }

    /// True for LUKS, false for legacy AES.
    pub(crate) fn is_luks(&self) -> bool {
        self.luks
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher.as_ref().ok_or(Error::Key(
            "Parameter 'encrypt.key-secret' is required for cipher".into(),
        ))
    }

    fn sector(&self, host: u64, guest: u64) -> u64 {
        if self.luks {
            host / SECTOR
        } else {
            guest / SECTOR
        }
    }

    /// Reads and decrypts guest data at `guest` stored at `host` (same offset within a
    /// sector, as both are cluster aligned).
    pub(crate) fn read(
        &self,
        s: &dyn Storage,
        dst: &mut [u8],
        host: u64,
        guest: u64,
    ) -> Result<()> {
        let cipher = self.cipher()?;
        let lead = host % SECTOR;
        if lead == 0 && (dst.len() as u64).is_multiple_of(SECTOR) {
            // Whole sectors: decrypt in place, no bounce buffer.
            read_host(s, dst, host)?;
            return cipher.decrypt(dst, self.sector(host, guest));
        }
        let start = host - lead;
        let span = (lead + dst.len() as u64).div_ceil(SECTOR) * SECTOR;
        let mut buf = vec![0u8; idx(span)?];
        read_host(s, &mut buf, start)?;
        cipher.decrypt(&mut buf, self.sector(start, guest.saturating_sub(lead)))?;
        let l = idx(lead)?;
        dst.copy_from_slice(
            buf.get(l..l + dst.len())
                .ok_or(internal("encrypted read range"))?,
        );
        Ok(())
    }

    /// Encrypts and writes guest data `src` for `guest` at `host`. Partly covered
    /// sectors at either end are read, decrypted and merged first.
    pub(crate) fn write(&self, s: &dyn Storage, src: &[u8], host: u64, guest: u64) -> Result<()> {
        let cipher = self.cipher()?;
        let lead = host % SECTOR;
        let start = host - lead;
        let end = host + src.len() as u64;
        let span = end.div_ceil(SECTOR) * SECTOR - start;
        let mut buf = vec![0u8; idx(span)?];
        let first = self.sector(start, guest.saturating_sub(lead));
        if lead != 0 {
            let head = buf.get_mut(..512).ok_or(internal("encrypted write"))?;
            read_host(s, head, start)?;
            cipher.decrypt(head, first)?;
        }
        if !end.is_multiple_of(SECTOR) && (lead == 0 || span > SECTOR) {
            let t = idx(span - SECTOR)?;
            let tail = buf.get_mut(t..).ok_or(internal("encrypted write"))?;
            read_host(s, tail, start + span - SECTOR)?;
            cipher.decrypt(tail, first + (span / SECTOR - 1))?;
        }
        buf.put(idx(lead)?, src);
        cipher.encrypt(&mut buf, first)?;
        s.write_all_at(&buf, start)
    }
}

/// Writes guest data `src` for `guest` at `host`, encrypted when `crypt` is set.
pub(crate) fn write_data(
    crypt: Option<&Encryption>,
    s: &dyn Storage,
    src: &[u8],
    host: u64,
    guest: u64,
) -> Result<()> {
    s.debug_event(DebugEvent::WriteAio);
    match crypt {
        Some(c) => c.write(s, src, host, guest),
        None => s.write_all_at(src, host),
    }
}
