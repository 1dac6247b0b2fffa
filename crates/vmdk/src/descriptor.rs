//! The text descriptor (VMware "Virtual Disk Format 5.0" §"The Descriptor File"):
//! header keys, extent description lines and the disk database, parsed the way qemu's
//! `vmdk_parse_description`/`vmdk_parse_extents` do, and written in qemu's layout.

use diskimg_blockio::{Error, Result};

/// The largest descriptor read (qemu reads at most 1 MiB - 1).
pub(crate) const MAX_DESCRIPTOR: u64 = (1 << 20) - 1;

/// The type of one extent line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExtentType {
    /// `FLAT`: plain bytes at an offset in a file.
    Flat,
    /// `SPARSE`: a hosted sparse (`KDMV`) file.
    Sparse,
    /// `ZERO`: reads as zeroes, no file.
    Zero,
    /// `VMFS`: ESX flat file (as FLAT, offset 0).
    Vmfs,
    /// `VMFSSPARSE`: ESX `COWD` sparse file.
    VmfsSparse,
    /// `SESPARSE`: ESXi space-efficient sparse (not supported).
    SeSparse,
}

/// One extent description line: `ACCESS SECTORS TYPE "FILE" [OFFSET]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExtentLine {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// Size in sectors.
    pub sectors: u64,
    /// The extent type.
    pub kind: ExtentType,
    /// File name as written (empty for ZERO).
    pub file: String,
    /// Start offset in sectors inside a FLAT file.
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Descriptor {
    /// `CID`: content id of this link.
    pub cid: u32,
    /// `parentCID` (0xffffffff = no parent).
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// `parentFileNameHint`, if any.
    pub parent_hint: Option<String>,
    /// The extent lines, in order.
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` entries, in order, unquoted.
    pub ddb: Vec<(String, String)>,
}

/// The value of `key` in the descriptor (qemu `vmdk_parse_description`): a line starting
/// with the key, optional spaces, `=`, optional spaces, an optionally quoted value.
fn value_of<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?;
        let rest = rest.trim_start_matches([' ', '\t']).strip_prefix('=')?;
        let v = rest.trim_matches([' ', '\t', '\r']);
        Some(match v.strip_prefix('"') {
            Some(q) => q.split('"').next().unwrap_or(""),
            None => v,
        })
    })
}

fn parse_hex_u32(s: Option<&str>, default: u32) -> u32 {
    s.and_then(|v| u32::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(default)
}

/// True when `bytes` start like a text descriptor (qemu `vmdk_probe`'s text branch):
/// the first line that is not a comment or blank is `version=1|2|3`.
pub(crate) fn looks_like_descriptor(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    for line in text.split('\n') {
        let l = line.trim_end_matches(['\r', ' ']);
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        return matches!(l, "version=1" | "version=2" | "version=3");
    }
    false
}

impl Descriptor {
    /// Parses a descriptor. `with_extents` parses extent lines (separate descriptor
    /// files); an embedded descriptor's own file is the only extent.
    pub(crate) fn parse(text: &str, with_extents: bool) -> Result<Self> {
        let create_type = value_of(text, "createType")
            .ok_or_else(|| Error::corrupt_unplaced("vmdk", "invalid VMDK image descriptor"))?
            .to_string();
        let mut d = Descriptor {
            cid: parse_hex_u32(value_of(text, "CID"), 0xffff_ffff),
            parent_cid: parse_hex_u32(value_of(text, "parentCID"), 0xffff_ffff),
            create_type,
            parent_hint: value_of(text, "parentFileNameHint").map(str::to_string),
            extents: Vec::new(),
            ddb: Vec::new(),
        };
        for line in text.lines() {
            let l = line.trim();
            if let Some(rest) = l.strip_prefix("ddb.")
                && let Some((k, v)) = rest.split_once('=')
            {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|x| x.strip_suffix('"'))
                    .unwrap_or(v);
                d.ddb.push((format!("ddb.{}", k.trim()), v.to_string()));
            }
        }
        if with_extents {
            for line in text.lines() {
                if let Some(e) = parse_extent_line(line)? {
                    d.extents.push(e);
                }
            }
        }
        Ok(d)
    }

    /// A `ddb.` value.
    #[cfg(test)]
    pub(crate) fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn invalid_line(line: &str) -> Error {
    Error::corrupt_unplaced(
        "vmdk",
        format!(
            "Invalid extent line: {}",
            line.trim_end_matches(['\r', '\n'])
        ),
    )
}

/// Parses one line as qemu does: lines that are not `ACCESS SECTORS TYPE "NAME"…`
/// are skipped (`Ok(None)`); recognised but malformed lines are errors.
fn parse_extent_line(line: &str) -> Result<Option<ExtentLine>> {
    let mut words = line.split_ascii_whitespace();
    let (Some(access), Some(sectors), Some(kind)) = (words.next(), words.next(), words.next())
    else {
        return Ok(None);
    };
    if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
        return Ok(None);
    }
    let Ok(sectors) = sectors.parse::<i64>() else {
        return Ok(None);
    };
    // The file name is the quoted string after the type.
    let after_type = line
        .find(kind)
        .and_then(|i| line.get(i + kind.len()..))
        .unwrap_or("");
    let after_type = after_type.trim_start();
    let (file, tail) = match after_type.strip_prefix('"') {
        Some(q) => match q.find(['"', '\r', '\n']) {
            Some(end) if q.get(end..end + 1) == Some("\"") => {
                (q.get(..end).unwrap_or(""), q.get(end + 1..).unwrap_or(""))
            }
            _ => return Ok(None),
        },
        None if kind == "ZERO" => ("", after_type),
        None => return Ok(None),
    };
    let tail = tail.trim();
    let offset: Option<i64> = if tail.is_empty() {
        None
    } else {
        match tail.split_ascii_whitespace().next().map(str::parse::<i64>) {
            Some(Ok(v)) => Some(v),
            _ => None,
        }
    };
    let kind = match kind {
        "FLAT" => ExtentType::Flat,
        "SPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        "VMFS" => ExtentType::Vmfs,
        "VMFSSPARSE" => ExtentType::VmfsSparse,
        "SESPARSE" => ExtentType::SeSparse,
        _ => return Ok(None),
    };
    let offset = match (kind, offset) {
        (ExtentType::Flat, Some(o)) if o >= 0 => o,
        (ExtentType::Flat, _) => return Err(invalid_line(line)),
        (ExtentType::Vmfs, None) => 0,
        (ExtentType::Vmfs, Some(_)) => return Err(invalid_line(line)),
        (_, None) => 0,
        (_, Some(_)) => return Err(invalid_line(line)),
    };
    if sectors <= 0 {
        return Ok(None);
    }
    Ok(Some(ExtentLine {
        access: access.to_string(),
        sectors: u64::try_from(sectors).unwrap_or(0),
        kind,
        file: file.to_string(),
        offset: u64::try_from(offset).unwrap_or(0),
    }))
}

/// The parameters of a descriptor qemu would write.
#[derive(Clone, Debug)]
pub(crate) struct NewDescriptor<'a> {
    /// `CID`.
    pub cid: u32,
    /// `parentCID`.
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: &'a str,
    /// `parentFileNameHint`.
    pub parent_hint: Option<&'a str>,
    /// Extent lines, each ending in `\n`.
    pub extent_lines: &'a str,
    /// `ddb.virtualHWVersion`.
    pub hw_version: &'a str,
    /// Virtual size in bytes (for the geometry).
    pub size: u64,
    /// `ddb.adapterType`.
    pub adapter_type: &'a str,
    /// `ddb.toolsVersion`.
    pub tools_version: &'a str,
}

impl NewDescriptor<'_> {
    /// The descriptor text in qemu's `vmdk_co_do_create` layout.
    pub(crate) fn render(&self) -> String {
        let heads: u64 = if self.adapter_type == "ide" { 16 } else { 255 };
        let cylinders = self.size / (63 * heads * 512);
        let parent = self
            .parent_hint
            .map(|p| format!("parentFileNameHint=\"{p}\"\n"))
            .unwrap_or_default();
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\ncreateType=\"{}\"\n{}\n\
             # Extent description\n{}\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\n\
             ddb.geometry.heads = \"{}\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            self.cid,
            self.parent_cid,
            self.create_type,
            parent,
            self.extent_lines,
            self.hw_version,
            cylinders,
            heads,
            self.adapter_type,
            self.tools_version
        )
    }
}

/// A random 32-bit value (for CIDs), from the standard library's random hasher keys.
pub(crate) fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let v = h.finish();
    u32::try_from(v >> 32).unwrap_or(0) ^ u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=ced5a875\nparentCID=ffffffff\n\
        createType=\"monolithicFlat\"\n\n# Extent description\nRW 10485760 FLAT \"m-flat.vmdk\" 0\n\n\
        # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"10402\"\n\
        ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n\
        ddb.toolsVersion = \"2147483647\"\n";

    #[test]
    fn parses_and_renders_qemu_layout() {
        let d = Descriptor::parse(QEMU_FLAT, true).unwrap();
        assert_eq!(d.cid, 0xced5_a875);
        assert_eq!(d.parent_cid, 0xffff_ffff);
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].kind, ExtentType::Flat);
        assert_eq!(d.extents[0].file, "m-flat.vmdk");
        assert_eq!(d.ddb("ddb.adapterType"), Some("ide"));
        let text = NewDescriptor {
            cid: 0xced5_a875,
            parent_cid: 0xffff_ffff,
            create_type: "monolithicFlat",
            parent_hint: None,
            extent_lines: "RW 10485760 FLAT \"m-flat.vmdk\" 0\n",
            hw_version: "4",
            size: 5 << 30,
            adapter_type: "ide",
            tools_version: "2147483647",
        }
        .render();
        assert_eq!(text, QEMU_FLAT);
        assert!(looks_like_descriptor(QEMU_FLAT.as_bytes()));
        assert!(!looks_like_descriptor(b"KDMV"));
    }

    #[test]
    fn malformed_extent_lines() {
        // iotest 059: FLAT without offset, VMFS with one.
        assert!(parse_extent_line("RW 12582912 FLAT \"dummy.vmdk\"").is_err());
        assert!(parse_extent_line("RW 12582912 VMFS \"dummy.vmdk\" 1").is_err());
        assert!(parse_extent_line("RW 12582912 SPARSE \"dummy.vmdk\" 1").is_err());
        assert_eq!(parse_extent_line("RW 12582912 FOO \"x\"").unwrap(), None);
        assert_eq!(parse_extent_line("# comment").unwrap(), None);
        assert_eq!(parse_extent_line("RW 0 SPARSE \"x\"").unwrap(), None);
        let z = parse_extent_line("RW 100 ZERO").unwrap().unwrap();
        assert_eq!(z.kind, ExtentType::Zero);
        assert!(Descriptor::parse("version=1\n", true).is_err());
    }
}
