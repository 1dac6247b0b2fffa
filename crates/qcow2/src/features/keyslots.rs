//! LUKS key-slot management, as `qemu-img amend -o encrypt.*` does it
//! (`encrypt.state=active|inactive`, `encrypt.new-secret`, `encrypt.old-secret`,
//! `encrypt.keyslot`, `encrypt.iter-time`), with qemu's messages: the options are parsed
//! into a [`KeySlotRequest`], then a slot is added ([`add_slot`]) or slots are erased
//! ([`erase_victims`]) in a copy of the LUKS header area, which is written back key
//! material first.

use diskimg_blockio::{Error, OptionList, Result, Secrets};

use crate::crypto::header::SLOTS;
use crate::crypto::{LuksHeader, iterations_for};
use crate::device::Qcow2Device;
use crate::disk::header::CRYPT_METHOD_AT;
use crate::encryption::Encryption;

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(msg.into())
}

fn key_required() -> Error {
    Error::Key("Parameter 'encrypt.key-secret' is required for cipher".into())
}

/// The `encrypt.*` amend options, parsed (qemu's value messages).
struct KeySlotRequest {
    /// `encrypt.state=active` (add a slot) rather than `inactive` (erase).
    activate: bool,
    /// `encrypt.keyslot`, checked to be a slot index.
    keyslot: Option<usize>,
    /// `encrypt.new-secret`: the id of the passphrase to add.
    new: Option<String>,
    /// `encrypt.old-secret`: the id of the passphrase whose slots are erased.
    old: Option<String>,
    /// `encrypt.iter-time` in milliseconds (default 2000).
    iter_time: u64,
    /// qemu-img amend's `--force`: overwrite an active slot, erase the last ones.
    force: bool,
}

impl KeySlotRequest {
    /// Takes the `encrypt.*` keys from `o` (other keys stay).
    fn take(o: &mut OptionList) -> Result<Self> {
        if let Some(f) = o.take("encrypt.format")
            && f != "luks"
        {
            return Err(invalid("Changing the encryption format is not supported"));
        }
        let state = o
            .take_enum("encrypt.state", &["active", "inactive"])?
            .ok_or_else(|| invalid("Parameter 'state' is missing"))?;
        let keyslot = match o.take("encrypt.keyslot") {
            None => None,
            Some(v) => {
                let n: i64 = v.parse().map_err(|_| {
                    invalid(format!("Parameter 'keyslot' expects a number, got '{v}'"))
                })?;
                let slot = usize::try_from(n).ok().filter(|&n| n < SLOTS);
                Some(slot.ok_or_else(|| {
                    invalid(format!(
                        "Invalid keyslot {n} specified, must be between 0 and {}",
                        SLOTS - 1
                    ))
                })?)
            }
        };
        Ok(Self {
            activate: state == "active",
            keyslot,
            new: o.take("encrypt.new-secret"),
            old: o.take("encrypt.old-secret"),
            iter_time: o.take_u64("encrypt.iter-time")?.unwrap_or(2000),
            force: false,
        })
    }
}

impl Qcow2Device {
    /// Adds or erases LUKS key slots (`qemu-img amend` with `encrypt.*` options). Takes
    /// the `encrypt.*` keys from `options` (other keys are left for the caller); secrets
    /// named by `encrypt.new-secret` / `encrypt.old-secret` come from `secrets`. The image
    /// must have been opened read-write with its key.
    pub fn amend_encryption(&self, options: &mut OptionList, secrets: &Secrets) -> Result<()> {
        self.amend_encryption_forced(options, secrets, false)
    }

    /// [`Qcow2Device::amend_encryption`] with qemu-img amend's `--force` (`force`): an
    /// active slot may be overwritten, and the last active slots erased (which loses the
    /// data irreversibly).
    pub fn amend_encryption_forced(
        &self,
        options: &mut OptionList,
        secrets: &Secrets,
        force: bool,
    ) -> Result<()> {
        self.writable()?;
        let crypt = self
            .crypt
            .as_ref()
            .filter(|c| c.is_luks())
            .ok_or_else(|| invalid("Encryption amend is only supported for LUKS images"))?;
        let mut req = KeySlotRequest::take(options)?;
        req.force = force;
        let (off, len) = self.lock().h().ext.crypto.ok_or(Error::corrupt(
            "qcow2",
            "encryption header extension missing",
            CRYPT_METHOD_AT,
        ))?;
        // Lock order as `info`: metadata before the LUKS header.
        let limits = self.lock().limits();
        let mut guard = crypt.header.lock().unwrap_or_else(|e| e.into_inner());
        let mut hdr = guard.clone().ok_or_else(key_required)?;
        let mut area = limits.alloc("LUKS header area", len)?;
        self.file.read_exact_at(&mut area, off)?;
        if req.activate {
            add_slot(crypt, &mut hdr, &mut area, &req, secrets)?;
        } else {
            for i in erase_victims(&hdr, &area, &req, secrets)? {
                hdr.erase_slot(i, &mut area)?;
            }
        }
        // Key material first, then the phdr that makes a slot (in)active.
        let phdr_len = crate::crypto::header::PHDR_LEN;
        let rest = area.get(phdr_len..).unwrap_or(&[]);
        self.file.write_all_at(rest, off + phdr_len as u64)?;
        self.file.flush()?;
        self.file
            .write_all_at(area.get(..phdr_len).unwrap_or(&[]), off)?;
        self.file.flush()?;
        *guard = Some(hdr);
        Ok(())
    }
}

/// The slots of `hdr` in use.
fn active_slots(hdr: &LuksHeader) -> Vec<usize> {
    (0..SLOTS)
        .filter(|&i| hdr.slots.get(i).is_some_and(|s| s.active))
        .collect()
}

/// `encrypt.state=active`: the master key under the new passphrase in the requested (or
/// first free) slot of `hdr` / `area`.
fn add_slot(
    crypt: &Encryption,
    hdr: &mut LuksHeader,
    area: &mut [u8],
    req: &KeySlotRequest,
    secrets: &Secrets,
) -> Result<()> {
    let new = req
        .new
        .as_deref()
        .ok_or_else(|| invalid("'new-secret' is required to activate a keyslot"))?;
    if req.old.is_some() {
        return Err(invalid(
            "'old-secret' must not be given when activating keyslots",
        ));
    }
    let active = active_slots(hdr);
    let slot = match req.keyslot {
        Some(i) if active.contains(&i) && !req.force => {
            return Err(invalid(format!(
                "Refusing to overwrite active keyslot {i} - please erase it first"
            )));
        }
        Some(i) => i,
        None => (0..SLOTS)
            .find(|i| !active.contains(i))
            .ok_or_else(|| invalid("Can't add a keyslot - all keyslots are in use"))?,
    };
    let pass = secrets.require(new)?;
    let mk = crypt.master_key.as_ref().ok_or_else(key_required)?;
    let iters = iterations_for(hdr.hash, mk.len(), req.iter_time);
    hdr.set_slot(slot, mk, pass, iters, area)
}

/// `encrypt.state=inactive`: the slots to erase (the given one, or every slot the old
/// passphrase opens), refusing to erase the last one.
fn erase_victims(
    hdr: &LuksHeader,
    area: &[u8],
    req: &KeySlotRequest,
    secrets: &Secrets,
) -> Result<Vec<usize>> {
    if req.new.is_some() {
        return Err(invalid(
            "'new-secret' must not be given when erasing keyslots",
        ));
    }
    let read = |o: u64, n: usize| -> Result<Vec<u8>> {
        let s = usize::try_from(o).map_err(|_| invalid("offset"))?;
        area.get(s..s.saturating_add(n))
            .map(<[u8]>::to_vec)
            .ok_or(Error::corrupt(
                "qcow2",
                "LUKS key material beyond the header area",
                o,
            ))
    };
    let active = active_slots(hdr);
    let old_pass = req
        .old
        .as_deref()
        .map(|id| secrets.require(id))
        .transpose()?;
    match (req.keyslot, old_pass) {
        (None, None) => Err(invalid(
            "To erase keyslot(s), either explicit keyslot index or the password \
             currently contained in them must be given",
        )),
        (Some(i), pass) => {
            if !active.contains(&i) {
                // As qemu: with --force an inactive slot is erased again (a no-op).
                if req.force {
                    return Ok(vec![i]);
                }
                return Err(invalid(format!(
                    "Given keyslot {i} is already erased (inactive) "
                )));
            }
            if let Some(p) = pass
                && hdr.open_slot(i, p, &read)?.is_none()
            {
                return Err(invalid(format!(
                    "Given keyslot {i} doesn't contain the given old password for erase \
                     operation"
                )));
            }
            if active.len() == 1 && !req.force {
                return Err(invalid(format!(
                    "Attempt to erase the only active keyslot {i} which will erase all \
                     the data in the image irreversibly - refusing operation"
                )));
            }
            Ok(vec![i])
        }
        (None, Some(p)) => {
            let mut v = Vec::new();
            for &i in &active {
                if hdr.open_slot(i, p, &read)?.is_some() {
                    v.push(i);
                }
            }
            if v.is_empty() {
                return Err(invalid(
                    "No keyslots match given (old) password for erase operation",
                ));
            }
            if v.len() == active.len() && !req.force {
                return Err(invalid(
                    "All the active keyslots match the (old) password that was given and \
                     erasing them will erase all the data in the image irreversibly - \
                     refusing operation",
                ));
            }
            Ok(v)
        }
    }
}
