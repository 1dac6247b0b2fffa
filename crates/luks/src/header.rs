//! LUKS1 headers (the standalone `luks` format and qcow2's `encrypt.format=luks`; LUKS On-Disk Format
//! Specification 1.2.3, section 2).
//!
//! [`LuksHeader::parse`] reads the 592-byte phdr; [`LuksHeader::unlock`] derives a key-slot
//! key with PBKDF2, decrypts and AF-merges the key material, and verifies the master key
//! against the header digest. [`LuksHeader::create`] builds a new header with one key slot.

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Result};
use zeroize::Zeroizing;

use crate::af;
use crate::cipher::{IvGen, Mode, SECTOR, SectorCipher};
use crate::hash::{HashAlg, random_bytes};

/// `LUKS\xba\xbe` (spec 2.4 `magic`).
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Size of the phdr in bytes.
pub const PHDR_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
/// Stripes qemu and cryptsetup use.
pub const STRIPES: u32 = 4000;
/// Beyond this many PBKDF2 iterations an image is refused: a hostile header must not make
/// an open spin for hours. (cryptsetup's defaults stay far below.)
pub const MAX_ITERATIONS: u32 = 1 << 26;

/// One key slot (spec 2.4, `keyblock`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// `active`: 0x00AC71F3 when in use.
    pub active: bool,
    /// `passwordIterations`.
    pub iterations: u32,
    /// `passwordSalt`.
    pub salt: [u8; SALT_LEN],
    /// `keyMaterialOffset`, in 512-byte sectors from the start of the header.
    pub key_offset_sectors: u32,
    /// `stripes`.
    pub stripes: u32,
}

/// A parsed LUKS1 phdr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksHeader {
    /// `cipherName` (only `aes` is supported).
    pub cipher_name: String,
    /// `cipherMode`, e.g. `xts-plain64`, `cbc-essiv:sha256`.
    pub cipher_mode: String,
    /// `hashSpec` for PBKDF2 and AF.
    pub hash: HashAlg,
    /// `payloadOffset` in sectors.
    pub payload_offset: u32,
    /// `keyBytes`: master key length.
    pub key_bytes: u32,
    /// `mkDigest`.
    pub mk_digest: [u8; DIGEST_LEN],
    /// `mkDigestSalt`.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// `mkDigestIter`.
    pub mk_digest_iter: u32,
    /// `uuid` (ASCII).
    pub uuid: String,
    /// The eight key slots.
    pub slots: Vec<KeySlot>,
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(b.get(..end).unwrap_or(&[])).into_owned()
}

fn corrupt(what: &'static str, off: usize) -> Error {
    Error::corrupt("luks", what, off as u64)
}

/// Splits a LUKS cipher mode (`xts-plain64`, `cbc-essiv:sha256`, `ecb`) into mode and IV.
pub fn parse_mode(s: &str) -> Result<(Mode, IvGen)> {
    let (mode, iv) = s.split_once('-').unwrap_or((s, ""));
    let mode = Mode::parse(mode)?;
    let iv = match iv {
        "" if mode == Mode::Ecb => IvGen::None,
        "plain" => IvGen::Plain,
        "plain64" => IvGen::Plain64,
        e if e.starts_with("essiv:") => IvGen::Essiv(HashAlg::parse(&e[6..])?),
        other => {
            return Err(Error::unsupported(
                "luks",
                format!("LUKS IV generator '{other}'"),
            ));
        }
    };
    Ok((mode, iv))
}

impl LuksHeader {
    /// Parses and validates a phdr.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.get(..6) != Some(&MAGIC[..]) {
            return Err(Error::not_format("luks", "LUKS header magic missing", 0));
        }
        if b.be_u16(6) != Some(1) {
            return Err(Error::unsupported("luks", "LUKS versions other than 1"));
        }
        let field = |off: usize, len: usize| {
            b.get(off..off + len)
                .ok_or(corrupt("LUKS header truncated", off))
        };
        let cipher_name = cstr(field(8, 32)?);
        let cipher_mode = cstr(field(40, 32)?);
        let hash = HashAlg::parse(&cstr(field(72, 32)?))?;
        let payload_offset = b.be_u32(104).ok_or(corrupt("LUKS header truncated", 104))?;
        let key_bytes = b.be_u32(108).ok_or(corrupt("LUKS header truncated", 108))?;
        let mk_digest = b
            .array_at(112)
            .ok_or(corrupt("LUKS header truncated", 112))?;
        let mk_digest_salt = b
            .array_at(132)
            .ok_or(corrupt("LUKS header truncated", 132))?;
        let mk_digest_iter = b.be_u32(164).ok_or(corrupt("LUKS header truncated", 164))?;
        let uuid = cstr(field(168, 40)?);
        if !matches!(key_bytes, 16 | 24 | 32 | 48 | 64) {
            return Err(corrupt("LUKS key size invalid", 108));
        }
        if mk_digest_iter == 0 || mk_digest_iter > MAX_ITERATIONS {
            return Err(corrupt(
                "LUKS master key digest iteration count out of range",
                164,
            ));
        }
        let mut slots = Vec::new();
        for i in 0..SLOTS {
            let o = 208 + i * 48;
            let t = || corrupt("LUKS key slot truncated", o);
            let state = b.be_u32(o).ok_or_else(t)?;
            let active = match state {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                _ => return Err(corrupt("LUKS key slot state invalid", o)),
            };
            let slot = KeySlot {
                active,
                iterations: b.be_u32(o + 4).ok_or_else(t)?,
                salt: b.array_at(o + 8).ok_or_else(t)?,
                key_offset_sectors: b.be_u32(o + 40).ok_or_else(t)?,
                stripes: b.be_u32(o + 44).ok_or_else(t)?,
            };
            if active
                && (slot.iterations == 0
                    || slot.iterations > MAX_ITERATIONS
                    || slot.stripes == 0
                    || slot.stripes > 1 << 16)
            {
                return Err(corrupt("LUKS key slot parameters out of range", o));
            }
            slots.push(slot);
        }
        if cipher_name != "aes" {
            return Err(Error::unsupported(
                "luks",
                format!("LUKS cipher '{cipher_name}'"),
            ));
        }
        parse_mode(&cipher_mode)?;
        Ok(Self {
            cipher_name,
            cipher_mode,
            hash,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter,
            uuid,
            slots,
        })
    }

    /// Serialises the phdr (592 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; PHDR_LEN];
        b.put(0, &MAGIC);
        b.put_be_u16(6, 1);
        let put_str = |b: &mut Vec<u8>, off: usize, s: &str, max: usize| {
            let s = s.as_bytes();
            b.put(off, s.get(..s.len().min(max - 1)).unwrap_or(&[]));
        };
        put_str(&mut b, 8, &self.cipher_name, 32);
        put_str(&mut b, 40, &self.cipher_mode, 32);
        put_str(&mut b, 72, self.hash.name(), 32);
        b.put_be_u32(104, self.payload_offset);
        b.put_be_u32(108, self.key_bytes);
        b.put(112, &self.mk_digest);
        b.put(132, &self.mk_digest_salt);
        b.put_be_u32(164, self.mk_digest_iter);
        put_str(&mut b, 168, &self.uuid, 40);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            b.put_be_u32(o, if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE });
            b.put_be_u32(o + 4, s.iterations);
            b.put(o + 8, &s.salt);
            b.put_be_u32(o + 40, s.key_offset_sectors);
            b.put_be_u32(o + 44, s.stripes);
        }
        b
    }

    /// The data cipher for a master key.
    pub fn data_cipher(&self, master_key: &[u8]) -> Result<SectorCipher> {
        let (mode, iv) = parse_mode(&self.cipher_mode)?;
        SectorCipher::new(mode, iv, master_key)
    }

    fn key_material_len(&self, slot: &KeySlot) -> Result<usize> {
        let kb = usize::try_from(self.key_bytes).map_err(|_| Error::internal("key size"))?;
        let st = usize::try_from(slot.stripes).map_err(|_| Error::internal("stripes"))?;
        let n = kb
            .checked_mul(st)
            .ok_or(Error::internal("key material size"))?;
        Ok(n.div_ceil(SECTOR) * SECTOR)
    }

    /// Checks a candidate master key against `mkDigest`.
    pub fn verify_master_key(&self, mk: &[u8]) -> bool {
        let mut d = [0u8; DIGEST_LEN];
        self.hash
            .pbkdf2(mk, &self.mk_digest_salt, self.mk_digest_iter, &mut d);
        d == self.mk_digest
    }

    /// Tries `passphrase` on every active slot. `read` returns `len` bytes at a byte
    /// offset relative to the start of the header. Returns the master key and slot index.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
    ) -> Result<(Zeroizing<Vec<u8>>, usize)> {
        for i in 0..self.slots.len() {
            if let Some(mk) = self.open_slot(i, passphrase, read)? {
                return Ok((mk, i));
            }
        }
        Err(Error::Key(
            "Invalid password, cannot unlock any keyslot".into(),
        ))
    }

    /// The master key if `passphrase` opens (active) slot `i`.
    pub fn open_slot(
        &self,
        i: usize,
        passphrase: &[u8],
        read: &dyn Fn(u64, usize) -> Result<Vec<u8>>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let Some(slot) = self.slots.get(i).filter(|s| s.active) else {
            return Ok(None);
        };
        let kb = usize::try_from(self.key_bytes).map_err(|_| Error::internal("key size"))?;
        let mut derived = Zeroizing::new(vec![0u8; kb]);
        self.hash
            .pbkdf2(passphrase, &slot.salt, slot.iterations, &mut derived);
        let len = self.key_material_len(slot)?;
        let at = u64::from(slot.key_offset_sectors) * 512;
        let mut material = Zeroizing::new(read(at, len)?);
        if material.len() != len {
            return Err(Error::corrupt("luks", "LUKS key material truncated", at));
        }
        self.data_cipher(&derived)?.decrypt(&mut material, 0)?;
        let mk = Zeroizing::new(af::merge(self.hash, &material, kb, slot.stripes)?);
        Ok(self.verify_master_key(&mk).then_some(mk))
    }

    /// Erases key slot `i` as qemu does: its key material in `area` is overwritten with
    /// random bytes, the slot marked inactive with zero iterations and salt.
    pub fn erase_slot(&mut self, i: usize, area: &mut [u8]) -> Result<()> {
        let slot = self
            .slots
            .get(i)
            .cloned()
            .ok_or(Error::invalid("no such key slot"))?;
        let len = self.key_material_len(&slot)?;
        let mut junk = vec![0u8; len];
        random_bytes(&mut junk)?;
        let off = slot.key_offset_sectors as usize * SECTOR;
        if !area.put(off, &junk) {
            return Err(Error::invalid("key material does not fit the header area"));
        }
        if let Some(s) = self.slots.get_mut(i) {
            s.active = false;
            s.iterations = 0;
            s.salt = [0; SALT_LEN];
        }
        area.put(0, &self.to_bytes());
        Ok(())
    }

    /// Builds a header for a new master key with `passphrase` in slot 0. Returns the header
    /// and the whole header area (phdr + key material, `payload_offset` sectors long).
    pub fn create(
        params: &LuksParams,
        master_key: &[u8],
        passphrase: &[u8],
    ) -> Result<(Self, Vec<u8>)> {
        let kb = master_key.len();
        let mut mk_digest_salt = [0u8; SALT_LEN];
        random_bytes(&mut mk_digest_salt)?;
        let mut uuid_raw = [0u8; 16];
        random_bytes(&mut uuid_raw)?;
        let h = |r: std::ops::Range<usize>| -> String {
            uuid_raw
                .get(r)
                .unwrap_or(&[])
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            h(0..4),
            h(4..6),
            h(6..8),
            h(8..10),
            h(10..16)
        );
        // Key material layout as qemu: slots start at 4 KiB, each aligned to 4 KiB.
        let material_sectors = u32::try_from((kb * STRIPES as usize).div_ceil(SECTOR))
            .map_err(|_| Error::invalid("key too large"))?;
        let slot_sectors = material_sectors.div_ceil(8) * 8;
        let first = 4096 / 512;
        let mut slots = Vec::new();
        for i in 0..8u32 {
            slots.push(KeySlot {
                active: false,
                iterations: 0,
                salt: [0; SALT_LEN],
                key_offset_sectors: first + slot_sectors * i,
                stripes: STRIPES,
            });
        }
        let payload_offset = first + slot_sectors * 8;
        let mut hdr = Self {
            cipher_name: "aes".into(),
            cipher_mode: params.cipher_mode.clone(),
            hash: params.hash,
            payload_offset,
            key_bytes: u32::try_from(kb).map_err(|_| Error::invalid("key too large"))?,
            mk_digest: [0; DIGEST_LEN],
            mk_digest_salt,
            mk_digest_iter: params.digest_iterations.clamp(1000, MAX_ITERATIONS),
            uuid,
            slots,
        };
        parse_mode(&hdr.cipher_mode)?;
        let mut d = [0u8; DIGEST_LEN];
        hdr.hash
            .pbkdf2(master_key, &hdr.mk_digest_salt, hdr.mk_digest_iter, &mut d);
        hdr.mk_digest = d;
        let mut area = vec![0u8; payload_offset as usize * SECTOR];
        hdr.set_slot(0, master_key, passphrase, params.iterations, &mut area)?;
        let phdr = hdr.to_bytes();
        area.put(0, &phdr);
        Ok((hdr, area))
    }

    /// Fills key slot `i` with `passphrase` (key material written into `area`, the header
    /// area starting at the phdr).
    pub fn set_slot(
        &mut self,
        i: usize,
        master_key: &[u8],
        passphrase: &[u8],
        iterations: u32,
        area: &mut [u8],
    ) -> Result<()> {
        let kb = master_key.len();
        let slot = self
            .slots
            .get(i)
            .cloned()
            .ok_or(Error::invalid("no such key slot"))?;
        let mut salt = [0u8; SALT_LEN];
        random_bytes(&mut salt)?;
        let iterations = iterations.clamp(1000, MAX_ITERATIONS);
        let mut derived = Zeroizing::new(vec![0u8; kb]);
        self.hash
            .pbkdf2(passphrase, &salt, iterations, &mut derived);
        let mut random = Zeroizing::new(vec![0u8; kb * (slot.stripes as usize - 1)]);
        random_bytes(&mut random)?;
        let mut material = Zeroizing::new(af::split(self.hash, master_key, slot.stripes, &random)?);
        let len = self.key_material_len(&slot)?;
        material.resize(len, 0);
        self.data_cipher(&derived)?.encrypt(&mut material, 0)?;
        let off = slot.key_offset_sectors as usize * SECTOR;
        if !area.put(off, &material) {
            return Err(Error::invalid("key material does not fit the header area"));
        }
        if let Some(s) = self.slots.get_mut(i) {
            s.active = true;
            s.iterations = iterations;
            s.salt = salt;
        }
        area.put(0, &self.to_bytes());
        Ok(())
    }
}

/// Parameters for a new LUKS header (qemu's `encrypt.*` create options).
#[derive(Clone, Debug)]
pub struct LuksParams {
    /// `cipher-mode` + `ivgen-alg` as LUKS stores them (`xts-plain64`).
    pub cipher_mode: String,
    /// `hash-alg`.
    pub hash: HashAlg,
    /// PBKDF2 iterations for the key slot.
    pub iterations: u32,
    /// PBKDF2 iterations for the master-key digest (`mkDigestIter`).
    pub digest_iterations: u32,
}

impl Default for LuksParams {
    fn default() -> Self {
        Self {
            cipher_mode: "xts-plain64".into(),
            hash: HashAlg::Sha256,
            iterations: 1000,
            digest_iterations: 1000,
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn create_parse_unlock_round_trip() {
        let mk: Vec<u8> = (0..64u8).collect();
        let (hdr, area) = LuksHeader::create(&LuksParams::default(), &mk, b"secret").unwrap();
        let parsed = LuksHeader::parse(&area).unwrap();
        assert_eq!(parsed, hdr);
        let read = |off: u64, len: usize| -> Result<Vec<u8>> {
            Ok(area[off as usize..off as usize + len].to_vec())
        };
        let (got, slot) = parsed.unlock(b"secret", &read).unwrap();
        assert_eq!(&got[..], &mk[..]);
        assert_eq!(slot, 0);
        assert!(matches!(parsed.unlock(b"wrong", &read), Err(Error::Key(_))));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mk = [7u8; 32];
        let (_, area) = LuksHeader::create(
            &LuksParams {
                cipher_mode: "cbc-essiv:sha256".into(),
                ..LuksParams::default()
            },
            &mk,
            b"p",
        )
        .unwrap();
        for len in [0, 5, 100, 300, 591] {
            assert!(LuksHeader::parse(&area[..len]).is_err());
        }
        let mut bad = area.clone();
        bad[108..112].copy_from_slice(&1000u32.to_be_bytes());
        assert!(LuksHeader::parse(&bad).is_err());
        let mut bad = area.clone();
        bad[212..216].copy_from_slice(&u32::MAX.to_be_bytes()); // slot 0 iterations
        assert!(LuksHeader::parse(&bad).is_err());
        let mut bad = area;
        bad[8..11].copy_from_slice(b"des");
        assert!(LuksHeader::parse(&bad).is_err());
    }

    #[test]
    fn modes_parse() {
        assert_eq!(
            parse_mode("xts-plain64").unwrap(),
            (Mode::Xts, IvGen::Plain64)
        );
        assert_eq!(
            parse_mode("cbc-essiv:sha256").unwrap(),
            (Mode::Cbc, IvGen::Essiv(HashAlg::Sha256))
        );
        assert_eq!(parse_mode("ecb").unwrap(), (Mode::Ecb, IvGen::None));
        assert!(parse_mode("ctr-plain").is_err());
        assert!(parse_mode("cbc-benbi").is_err());
    }
}
