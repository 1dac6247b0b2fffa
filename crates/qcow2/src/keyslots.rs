//! LUKS key-slot management, as `qemu-img amend -o encrypt.*` does it
//! (`encrypt.state=active|inactive`, `encrypt.new-secret`, `encrypt.old-secret`,
//! `encrypt.keyslot`, `encrypt.iter-time`), with qemu's messages.

use diskimg_blockio::{Error, OptionList, Result, Secrets};

use crate::crypto::header::SLOTS;
use crate::crypto::iterations_for;
use crate::device::Qcow2Device;

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(msg.into())
}

impl Qcow2Device {
    /// Adds or erases LUKS key slots (`qemu-img amend` with `encrypt.*` options). Takes
    /// the `encrypt.*` keys from `options` (other keys are left for the caller); secrets
    /// named by `encrypt.new-secret` / `encrypt.old-secret` come from `secrets`. The image
    /// must have been opened read-write with its key.
    pub fn amend_encryption(&self, options: &mut OptionList, secrets: &Secrets) -> Result<()> {
        self.writable()?;
        let crypt = self
            .crypt
            .as_ref()
            .filter(|c| c.is_luks())
            .ok_or_else(|| invalid("Encryption amend is only supported for LUKS images"))?;
        if let Some(f) = options.take("encrypt.format")
            && f != "luks"
        {
            return Err(invalid("Changing the encryption format is not supported"));
        }
        let state = options
            .take_enum("encrypt.state", &["active", "inactive"])?
            .ok_or_else(|| invalid("Parameter 'state' is missing"))?;
        let keyslot = match options.take("encrypt.keyslot") {
            None => None,
            Some(v) => {
                let n: i64 = v.parse().map_err(|_| {
                    invalid(format!("Parameter 'keyslot' expects a number, got '{v}'"))
                })?;
                match usize::try_from(n).ok().filter(|&n| n < SLOTS) {
                    Some(n) => Some(n),
                    None => {
                        return Err(invalid(format!(
                            "Invalid keyslot {n} specified, must be between 0 and {}",
                            SLOTS - 1
                        )));
                    }
                }
            }
        };
        let new = options.take("encrypt.new-secret");
        let old = options.take("encrypt.old-secret");
        let iter_time = options.take_u64("encrypt.iter-time")?.unwrap_or(2000);
        let (off, len) = self.lock().h.ext.crypto.ok_or(Error::corrupt(
            "qcow2",
            "encryption header extension missing",
            0,
        ))?;
        // Lock order as `info`: metadata before the LUKS header.
        let limits = self.lock().limits;
        let mut guard = crypt.header.lock().unwrap_or_else(|e| e.into_inner());
        let mut hdr = guard.clone().ok_or_else(|| {
            Error::Key("Parameter 'encrypt.key-secret' is required for cipher".into())
        })?;
        let mut area = limits.alloc("LUKS header area", len)?;
        self.file.read_exact_at(&mut area, off)?;
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
        let active: Vec<usize> = (0..SLOTS)
            .filter(|&i| hdr.slots.get(i).is_some_and(|s| s.active))
            .collect();
        if state == "active" {
            let new =
                new.ok_or_else(|| invalid("'new-secret' is required to activate a keyslot"))?;
            if old.is_some() {
                return Err(invalid(
                    "'old-secret' must not be given when activating keyslots",
                ));
            }
            let slot = match keyslot {
                Some(i) if active.contains(&i) => {
                    return Err(invalid(format!(
                        "Refusing to overwrite active keyslot {i} - please erase it first"
                    )));
                }
                Some(i) => i,
                None => (0..SLOTS)
                    .find(|i| !active.contains(i))
                    .ok_or_else(|| invalid("Can't add a keyslot - all keyslots are in use"))?,
            };
            let pass = secrets.require(&new)?;
            let mk = crypt.master_key.as_ref().ok_or_else(|| {
                Error::Key("Parameter 'encrypt.key-secret' is required for cipher".into())
            })?;
            let iters = iterations_for(hdr.hash, mk.len(), iter_time);
            hdr.set_slot(slot, mk, pass, iters, &mut area)?;
        } else {
            if new.is_some() {
                return Err(invalid(
                    "'new-secret' must not be given when erasing keyslots",
                ));
            }
            let old_pass = old.as_deref().map(|id| secrets.require(id)).transpose()?;
            let victims: Vec<usize> = match (keyslot, old_pass) {
                (None, None) => {
                    return Err(invalid(
                        "To erase keyslot(s), either explicit keyslot index or the password \
                         currently contained in them must be given",
                    ));
                }
                (Some(i), pass) => {
                    if !active.contains(&i) {
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
                    if active.len() == 1 {
                        return Err(invalid(format!(
                            "Attempt to erase the only active keyslot {i} which will erase all \
                             the data in the image irreversibly - refusing operation"
                        )));
                    }
                    vec![i]
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
                    if v.len() == active.len() {
                        return Err(invalid(
                            "All the active keyslots match the (old) password that was given and \
                             erasing them will erase all the data in the image irreversibly - \
                             refusing operation",
                        ));
                    }
                    v
                }
            };
            for i in victims {
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
