//! The 1024-byte dynamic disk header (VHD spec, "Dynamic Disk Header Format") and the
//! parent locators of differencing disks.

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Limits, Result, Storage};

use crate::footer::FORMAT;
use crate::footer::checksum;

/// Size of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;
/// The header cookie ("Cookie" field).
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Offset of the checksum field in the header.
const CHECKSUM_AT: usize = 36;
/// A BAT entry meaning "block not allocated".
pub(crate) const UNALLOCATED: u32 = u32::MAX;
/// Offset of Max Table Entries in the dynamic disk header (spec: "Max Table Entries").
pub(crate) const MAX_ENTRIES_AT: u64 = 28;
/// Offset of Block Size in the dynamic disk header (spec: "Block Size").
pub(crate) const BLOCK_SIZE_AT: u64 = 32;
/// Offset of the first of the eight 24-byte parent locator entries.
const LOCATORS_AT: usize = 576;
pub use crate::locator::{MACX, W2KU, W2RU};
/// Largest parent locator payload read (a path; the spec gives no bound).
const MAX_LOCATOR_BYTES: u32 = 64 * 1024;

/// One parent locator entry (spec "Parent Locator Entries").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// "Platform Code".
    pub code: u32,
    /// The decoded path (backslashes turned into slashes).
    pub path: String,
}

/// The parsed dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    /// "Table Offset" (offset 16): host offset of the BAT.
    pub table_offset: u64,
    /// "Max Table Entries" (offset 28).
    pub max_table_entries: u32,
    /// "Block Size" (offset 32) in bytes.
    pub block_size: u32,
    /// "Parent Unique ID" (offset 40).
    pub parent_uuid: [u8; 16],
    /// "Parent Time Stamp" (offset 56).
    pub parent_timestamp: u32,
    /// "Parent Unicode Name" (offset 64, 512 bytes UTF-16BE), decoded.
    pub parent_name: String,
    /// Parsed W2ru, W2ku and MacX parent locators (other codes, such as the classic Mac
    /// OS alias `Mac `, are ignored).
    pub locators: Vec<Locator>,
}

impl DynHeader {
    /// Parses the header at host offset `at`; locators are read from `storage` only for
    /// differencing disks (`read_locators`).
    pub fn parse(
        buf: &[u8],
        at: u64,
        storage: &dyn Storage,
        limits: &Limits,
        read_locators: bool,
    ) -> Result<DynHeader> {
        let bad = |what| Error::corrupt(FORMAT, what, at);
        if buf.get(..8) != Some(COOKIE.as_slice()) {
            return Err(bad("dynamic disk header cookie is not cxsparse"));
        }
        let name_raw = buf
            .get(64..576)
            .ok_or(bad("dynamic disk header truncated"))?;
        let mut h = DynHeader {
            table_offset: buf.be_u64(16).ok_or(bad("dynamic disk header truncated"))?,
            max_table_entries: buf.be_u32(28).ok_or(bad("dynamic disk header truncated"))?,
            block_size: buf.be_u32(32).ok_or(bad("dynamic disk header truncated"))?,
            parent_uuid: buf
                .array_at(40)
                .ok_or(bad("dynamic disk header truncated"))?,
            parent_timestamp: buf.be_u32(56).ok_or(bad("dynamic disk header truncated"))?,
            parent_name: decode_utf16(name_raw, false),
            locators: Vec::new(),
        };
        if read_locators {
            let file_len = storage.len()?;
            for i in 0..8usize {
                let e = LOCATORS_AT + i * 24;
                let code = buf.be_u32(e).unwrap_or(0);
                if code != W2RU && code != W2KU && code != MACX {
                    continue;
                }
                let len = buf.be_u32(e + 8).unwrap_or(0);
                let off = buf.be_u64(e + 16).unwrap_or(0);
                let entry_at = at + e as u64;
                if len == 0 {
                    continue;
                }
                if len > MAX_LOCATOR_BYTES {
                    return Err(Error::corrupt(FORMAT, "parent locator too long", entry_at));
                }
                if off
                    .checked_add(u64::from(len))
                    .is_none_or(|end| end > file_len)
                {
                    return Err(Error::corrupt(
                        FORMAT,
                        "parent locator beyond the end of the file",
                        entry_at,
                    ));
                }
                let mut data = limits.alloc("vpc parent locator", u64::from(len))?;
                storage.read_exact_at(&mut data, off)?;
                let path = if code == MACX {
                    // An undecodable URL is no locator (as an unknown code).
                    match crate::locator::decode_macx(&data) {
                        Some(p) => p,
                        None => continue,
                    }
                } else {
                    decode_utf16(&data, true).replace('\\', "/")
                };
                h.locators.push(Locator { code, path });
            }
        }
        Ok(h)
    }

    /// The relative (W2ru) and absolute (W2ku) parent paths, if present.
    pub fn parent_paths(&self) -> (Option<String>, Option<String>) {
        let find = |code| {
            self.locators
                .iter()
                .find(|l| l.code == code && !l.path.is_empty())
                .map(|l| l.path.clone())
        };
        let rel = find(W2RU).map(|p| {
            let mut s = p.as_str();
            while let Some(rest) = s.strip_prefix("./") {
                s = rest;
            }
            s.to_string()
        });
        (rel, find(W2KU))
    }

    /// The parent path of the MacX locator (a decoded `file://` URL), if present.
    pub fn mac_path(&self) -> Option<String> {
        self.locators
            .iter()
            .find(|l| l.code == MACX && !l.path.is_empty())
            .map(|l| l.path.clone())
    }
}

/// One parent locator entry's host area (spec "Parent Locator Entries").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LocatorArea {
    /// "Platform Data Offset".
    pub(crate) offset: u64,
    /// "Platform Data Length", rounded up to whole sectors: the bytes that must stay.
    pub(crate) data: u64,
    /// "Platform Data Space" in bytes (at least `data`): room reserved for the path.
    pub(crate) reserved: u64,
}

/// The areas of every parent locator entry of the header bytes `buf` that has a
/// platform code (known or not) and data. The spec gives "Platform Data Space" in
/// sectors, but Virtual PC and Hyper-V store bytes there (VirtualBox's VHD.cpp says the
/// same): values below 512 are read as sectors, others as bytes.
pub(crate) fn locator_areas(buf: &[u8]) -> Vec<LocatorArea> {
    (0..8usize)
        .filter_map(|i| {
            let e = LOCATORS_AT + i * 24;
            let code = buf.be_u32(e)?;
            let space = u64::from(buf.be_u32(e + 4)?);
            let len = u64::from(buf.be_u32(e + 8)?);
            let offset = buf.be_u64(e + 16)?;
            if code == 0 || len == 0 {
                return None;
            }
            let data = len.next_multiple_of(512);
            let space = if space < 512 { space * 512 } else { space };
            Some(LocatorArea {
                offset,
                data,
                reserved: data.max(space),
            })
        })
        .collect()
}

/// Decodes UTF-16 (little-endian when `le`), stopping at the first NUL.
fn decode_utf16(buf: &[u8], le: bool) -> String {
    let units: Vec<u16> = buf
        .chunks_exact(2)
        .map(|c| match c {
            [a, b] if le => u16::from_le_bytes([*a, *b]),
            [a, b] => u16::from_be_bytes([*a, *b]),
            _ => 0,
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Encodes `s` as UTF-16 (little-endian when `le`).
pub fn encode_utf16(s: &str, le: bool) -> Vec<u8> {
    s.encode_utf16()
        .flat_map(|u| if le { u.to_le_bytes() } else { u.to_be_bytes() })
        .collect()
}

/// A parent locator to write: platform code, host offset of its data, data bytes.
pub struct NewLocator {
    /// "Platform Code".
    pub code: u32,
    /// Host offset of the (sector-aligned) data.
    pub offset: u64,
    /// The payload (UTF-16LE path, or UTF-8 URL for MacX).
    pub data: Vec<u8>,
}

/// Builds a dynamic disk header as qemu-img writes it (plus parent fields for a
/// differencing disk).
pub fn build(
    max_table_entries: u32,
    block_size: u32,
    parent: Option<(&[u8; 16], u32, &str, &[NewLocator])>,
) -> [u8; HEADER_SIZE] {
    let mut b = [0u8; HEADER_SIZE];
    b.put(0, COOKIE);
    // The spec says 0xFFFFFFFF, but Microsoft tools expect all 64 bits set (as qemu).
    b.put_be_u64(8, u64::MAX);
    b.put_be_u64(16, 3 * 512);
    b.put_be_u32(24, 0x0001_0000);
    b.put_be_u32(28, max_table_entries);
    b.put_be_u32(32, block_size);
    if let Some((uuid, ts, name, locs)) = parent {
        b.put(40, uuid);
        b.put_be_u32(56, ts);
        let mut n = encode_utf16(name, false);
        n.truncate(510);
        b.put(64, &n);
        for (i, l) in locs.iter().take(8).enumerate() {
            let e = LOCATORS_AT + i * 24;
            let len = u32::try_from(l.data.len()).unwrap_or(0);
            b.put_be_u32(e, l.code);
            b.put_be_u32(e + 4, len.div_ceil(512)); // data space in sectors (spec)
            b.put_be_u32(e + 8, len);
            b.put_be_u64(e + 16, l.offset);
        }
    }
    let sum = checksum(&b, CHECKSUM_AT);
    b.put_be_u32(CHECKSUM_AT, sum);
    b
}

/// True when the header's checksum field matches its bytes (qemu does not check it;
/// `check` reports a mismatch).
pub fn checksum_ok(buf: &[u8]) -> bool {
    buf.get(..HEADER_SIZE)
        .is_some_and(|h| buf.be_u32(CHECKSUM_AT) == Some(checksum(h, CHECKSUM_AT)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg_blockio::MemStorage;

    #[test]
    fn parent_locators_roundtrip() {
        let rel = encode_utf16(".\\base.vhd", true);
        let abs = encode_utf16("/images/base.vhd", true);
        let locs = [
            NewLocator {
                code: W2RU,
                offset: 2048,
                data: rel.clone(),
            },
            NewLocator {
                code: W2KU,
                offset: 2560,
                data: abs.clone(),
            },
        ];
        let h = build(4, 1 << 21, Some((&[9; 16], 77, "base.vhd", &locs)));
        let mut file = vec![0u8; 3072];
        file[2048..2048 + rel.len()].copy_from_slice(&rel);
        file[2560..2560 + abs.len()].copy_from_slice(&abs);
        let s = MemStorage::from_vec(file);
        let p = DynHeader::parse(&h, 512, &s, &Limits::default(), true).unwrap();
        assert!(checksum_ok(&h));
        assert_eq!(p.parent_uuid, [9; 16]);
        assert_eq!(p.parent_timestamp, 77);
        assert_eq!(p.parent_name, "base.vhd");
        assert_eq!(
            p.parent_paths(),
            (
                Some("base.vhd".to_string()),
                Some("/images/base.vhd".to_string())
            )
        );
        assert_eq!(p.mac_path(), None);
    }

    #[test]
    fn macx_locator_read_and_bad_url_ignored() {
        let url = b"file:///img/my%20base.vhd".to_vec();
        let bad = b"http://x/base.vhd".to_vec();
        let locs = [
            NewLocator {
                code: MACX,
                offset: 2048,
                data: bad.clone(),
            },
            NewLocator {
                code: MACX,
                offset: 2560,
                data: url.clone(),
            },
        ];
        let h = build(4, 1 << 21, Some((&[1; 16], 5, "my base.vhd", &locs)));
        let mut file = vec![0u8; 3072];
        file[2048..2048 + bad.len()].copy_from_slice(&bad);
        file[2560..2560 + url.len()].copy_from_slice(&url);
        let s = MemStorage::from_vec(file);
        let p = DynHeader::parse(&h, 512, &s, &Limits::default(), true).unwrap();
        assert_eq!(p.locators.len(), 1);
        assert_eq!(p.mac_path().as_deref(), Some("/img/my base.vhd"));
        assert_eq!(p.parent_paths(), (None, None));
    }
}
