//! Parent linkage of differencing images (MS-VHDX 2.6.2.6.1): the child records the
//! parent's `DataWriteGuid` in its parent locator (`parent_linkage`, optionally
//! `parent_linkage2`), and a parent whose data changed since (a new `DataWriteGuid`) is no
//! longer the child's parent. Hyper-V refuses such a chain; so does
//! [`set_backing`](diskimg_blockio::BlockDevice::set_backing), unless the image was opened
//! with the driver option `check_parent_linkage=off`.

use diskimg_blockio::{BlockDevice, ChainLink, Error, OpenOptions, Result};

use crate::device::VhdxDevice;
use crate::format::Guid;

/// The driver option that turns the check off (`on` by default).
pub const CHECK_OPTION: &str = "check_parent_linkage";

/// Parses `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case), the
/// inverse of [`Guid::to_braced_string`].
pub(crate) fn parse_guid(s: &str) -> Option<Guid> {
    let s = s.trim();
    let s = s
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(s);
    // (from_str_radix alone would also take a leading '+'.)
    if !s.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return None;
    }
    let parts: Vec<&str> = s.split('-').collect();
    let [d1, d2, d3, d4a, d4b] = parts.as_slice() else {
        return None;
    };
    if [d1.len(), d2.len(), d3.len(), d4a.len(), d4b.len()] != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex = |t: &str| -> Option<Vec<u8>> {
        (0..t.len())
            .step_by(2)
            .map(|i| t.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
            .collect()
    };
    let d1 = u32::from_str_radix(d1, 16).ok()?;
    let d2 = u16::from_str_radix(d2, 16).ok()?;
    let d3 = u16::from_str_radix(d3, 16).ok()?;
    let mut d4 = [0u8; 8];
    let tail = [hex(d4a)?, hex(d4b)?].concat();
    if tail.len() != 8 {
        return None;
    }
    d4.copy_from_slice(&tail);
    Some(Guid::from_fields(d1, d2, d3, d4))
}

/// Whether `options` ask for the linkage check (the default).
pub(crate) fn check_enabled(options: &OpenOptions) -> Result<bool> {
    match options.driver_options.get(CHECK_OPTION) {
        None | Some("on" | "true" | "yes") => Ok(true),
        Some("off" | "false" | "no") => Ok(false),
        Some(v) => Err(Error::invalid(format!(
            "Parameter '{CHECK_OPTION}' expects 'on' or 'off', not '{v}'"
        ))),
    }
}

impl VhdxDevice {
    /// The `DataWriteGuid` of the current header (what a child's `parent_linkage` names).
    pub fn data_write_guid(&self) -> String {
        self.read_state().header.data_write_guid.to_braced_string()
    }

    /// Refuses `parent` unless it is the VHDX whose `DataWriteGuid` this differencing
    /// image's `parent_linkage` (or `parent_linkage2`) names. A parent of another format,
    /// or a locator without a usable linkage (absent, zero, not a GUID), proves nothing
    /// and is refused too: otherwise any host `.vhdx` a locator names would be read.
    /// `check_parent_linkage=off` accepts any parent.
    pub(crate) fn verify_linkage(&self, parent: Option<&VhdxDevice>) -> Result<()> {
        if !self.check_linkage {
            return Ok(());
        }
        let off = format!("(open with {CHECK_OPTION}=off to use it anyway)");
        let Some(parent) = parent else {
            return Err(Error::invalid(format!(
                "the parent of a differencing VHDX must be a VHDX whose DataWriteGuid matches \
                 its parent_linkage {off}"
            )));
        };
        let text = self
            .meta
            .parent
            .as_ref()
            .and_then(|loc| loc.get("parent_linkage"))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "the differencing image has no parent_linkage: its parent cannot be \
                     verified {off}"
                ))
            })?;
        let want = parse_guid(text).ok_or_else(|| {
            Error::invalid(format!(
                "the differencing image's parent_linkage '{text}' is not a GUID {off}"
            ))
        })?;
        if want.is_zero() {
            return Err(Error::invalid(format!(
                "the differencing image's parent_linkage is zero: its parent cannot be \
                 verified {off}"
            )));
        }
        let loc = self.meta.parent.as_ref();
        let got = parent.read_state().header.data_write_guid;
        let alt = loc
            .and_then(|l| l.get("parent_linkage2"))
            .and_then(parse_guid);
        if got == want || alt == Some(got) {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "the parent VHDX's DataWriteGuid {} does not match the differencing image's \
             parent_linkage {}: the parent was modified after the child was created {off}",
            got.to_braced_string(),
            want.to_braced_string()
        )))
    }
}

impl VhdxDevice {
    /// Records `parent`'s current `DataWriteGuid` as this differencing image's
    /// `parent_linkage` (in place, through the log), after the parent's data changed in a
    /// way that keeps this child valid — `commit` copying the child's own data into it.
    /// The open device keeps its in-memory locator; reopen to verify against the new one.
    pub fn relink_parent(&self, parent: &VhdxDevice) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let Some((at, len)) = self.meta.parent.as_ref().and_then(|p| p.linkage_at) else {
            return Err(Error::unsupported(
                crate::format::FMT,
                "relinking an image without a parent_linkage",
            ));
        };
        let guid = parent
            .read_state()
            .header
            .data_write_guid
            .to_braced_string();
        let value: Vec<u8> = guid.encode_utf16().flat_map(u16::to_le_bytes).collect();
        if value.len() != len {
            return Err(Error::corrupt(
                crate::format::FMT,
                "parent_linkage value of an unexpected length",
                at,
            ));
        }
        let sector = crate::format::LOG_SECTOR;
        let first = at / sector * sector;
        let end = at + len as u64;
        let mut st = self.write_state();
        self.start_session(&mut st)?;
        let mut sectors = Vec::new();
        let mut s = first;
        while s < end {
            let mut data = vec![0u8; usize::try_from(sector).unwrap_or(4096)];
            self.storage.read_exact_at(&mut data, s)?;
            for (i, b) in value.iter().enumerate() {
                let pos = at + i as u64;
                if (s..s + sector).contains(&pos)
                    && let Some(d) = data.get_mut(usize::try_from(pos - s).unwrap_or(usize::MAX))
                {
                    *d = *b;
                }
            }
            sectors.push((s, data));
            s += sector;
        }
        self.commit(&mut st, sectors)?;
        self.flush_locked(&mut st)
    }
}

/// Differencing VHDX images link to their parent's data state (`parent_linkage`); the
/// backing reference itself cannot be rewritten and the image cannot be emptied.
impl ChainLink for VhdxDevice {
    fn set_backing_file(&self, _name: Option<&str>, _format: Option<&str>) -> Result<()> {
        Err(Error::unsupported(
            crate::format::FMT,
            "changing the backing file",
        ))
    }
    fn make_empty(&self) -> Result<()> {
        Err(Error::unsupported(crate::format::FMT, "emptying an image"))
    }
    /// [`VhdxDevice::relink_parent`] when `parent` is a VHDX image; other parents are
    /// not linked by state.
    fn relink_parent(&self, parent: &dyn BlockDevice) -> Result<()> {
        match parent.as_any().downcast_ref::<VhdxDevice>() {
            Some(p) => VhdxDevice::relink_parent(self, p),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_round_trip() {
        let g = Guid::random();
        assert_eq!(parse_guid(&g.to_braced_string()), Some(g));
        let s = g.to_braced_string().to_uppercase();
        assert_eq!(parse_guid(s.trim_matches(['{', '}'])), Some(g));
        let known = "{6677c2a2-3b1a-4c1d-8a2b-0123456789ab}";
        assert_eq!(parse_guid(known).unwrap().to_braced_string(), known);
        for bad in [
            "",
            "{}",
            "6677c2a2-3b1a-4c1d-8a2b",
            "6677c2a2-3b1a-4c1d-8a2b-0123456789aX",
            "6677c2a23-b1a-4c1d-8a2b-0123456789ab",
            "{6677c2a2-3b1a-4c1d-8a2b-0123456789ab-00}",
            "+677c2a2-3b1a-4c1d-8a2b-0123456789ab",
        ] {
            assert_eq!(parse_guid(bad), None, "{bad}");
        }
    }
}
