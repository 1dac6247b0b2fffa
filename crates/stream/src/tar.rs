//! Reading one member of a tar archive (an OVA, GCP's `disk.raw` in a tar.gz): from a
//! seekable storage as a [`SliceStorage`], or from a stream as a reader of the member.
//!
//! Headers are POSIX ustar / GNU (`ustar  `): names from the header (with the ustar
//! prefix), GNU long names (`L`) and pax `path`/`size` records; sizes in octal or GNU
//! base-256. Every header's checksum is verified.

use std::io::Read;
use std::sync::Arc;

use diskimg_blockio::{Error, Result, Storage};

/// Extensions taken as disk images when no member is named.
const DISK_EXTENSIONS: [&str; 8] = [
    ".vmdk", ".raw", ".img", ".qcow2", ".vhd", ".vhdx", ".vdi", ".iso",
];

/// True when `block` (the first 512 bytes of an input) is a tar header.
pub fn is_tar(block: &[u8]) -> bool {
    block.get(257..262) == Some(b"ustar") && header_checksum_ok(block)
}

fn header_checksum_ok(h: &[u8]) -> bool {
    let Some(stored) = h.get(148..156).and_then(octal) else {
        return false;
    };
    let sum: u64 = h
        .iter()
        .enumerate()
        .take(512)
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    sum == stored
}

fn octal(f: &[u8]) -> Option<u64> {
    let s = f
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| (b'0'..=b'7').contains(&b));
    let mut v = 0u64;
    let mut any = false;
    for &b in s {
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

fn size_field(f: &[u8]) -> Option<u64> {
    match f.first() {
        Some(&b) if b & 0x80 != 0 => f.iter().skip(1).try_fold(u64::from(b & 0x7f), |v, &b| {
            v.checked_mul(256)?.checked_add(u64::from(b))
        }),
        _ => octal(f),
    }
}

fn cstr(f: &[u8]) -> String {
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    String::from_utf8_lossy(f.get(..end).unwrap_or_default()).into_owned()
}

/// One member's header, as far as choosing and reading it goes.
#[derive(Clone, Debug)]
pub struct Member {
    /// Its path in the archive.
    pub name: String,
    /// Bytes of data.
    pub size: u64,
    /// Offset of the data in the archive.
    pub offset: u64,
    /// A regular file (not a directory, link or metadata record).
    pub regular: bool,
    /// A GNU sparse member (`S`): its data regions (offset, length) in the file and the
    /// file's length; the stored bytes are the regions one after the other.
    pub sparse: Option<(SparseMap, u64)>,
}

/// Data regions (offset, length) of a sparse member.
type SparseMap = Vec<(u64, u64)>;

/// Reads the sparse map of a GNU `S` header (and its extension blocks, read through
/// `read` from `data`); returns the map, the real size and where the data starts.
fn sparse_map(
    name: &str,
    h: &[u8],
    mut data: u64,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<bool>,
) -> Result<(SparseMap, u64, u64)> {
    let bad = || Error::corrupt_unplaced("tar", format!("'{name}': bad GNU sparse header"));
    let mut map = Vec::new();
    let entries = |block: &[u8], count: usize, map: &mut Vec<(u64, u64)>| -> Result<()> {
        for i in 0..count {
            let e = block.get(i * 24..i * 24 + 24).ok_or_else(bad)?;
            if e.first().is_none_or(|&b| b == 0) {
                break;
            }
            let off = size_field(e.get(..12).unwrap_or_default()).ok_or_else(bad)?;
            let len = size_field(e.get(12..).unwrap_or_default()).ok_or_else(bad)?;
            if map.len() >= 1 << 20 {
                return Err(bad());
            }
            map.push((off, len));
        }
        Ok(())
    };
    entries(h.get(386..482).unwrap_or_default(), 4, &mut map)?;
    let real = size_field(h.get(483..495).unwrap_or_default()).ok_or_else(bad)?;
    let mut extended = h.get(482).copied().unwrap_or(0) != 0;
    let mut ext = [0u8; 512];
    while extended {
        if !read(&mut ext, data)? {
            return Err(bad());
        }
        entries(&ext, 21, &mut map)?;
        extended = ext[504] != 0;
        data += 512;
    }
    Ok((map, real, data))
}

/// The bytes of a GNU sparse member: its regions from `inner` (stored back to back),
/// zeroes between them, up to the real size.
pub struct SparseReader {
    inner: Box<dyn Read + Send>,
    map: Vec<(u64, u64)>,
    real: u64,
    pos: u64,
    next: usize,
}

impl SparseReader {
    /// Expands `inner` (the stored regions) by `map` to `real` bytes.
    pub fn new(inner: Box<dyn Read + Send>, map: Vec<(u64, u64)>, real: u64) -> Self {
        Self {
            inner,
            map,
            real,
            pos: 0,
            next: 0,
        }
    }
}

impl Read for SparseReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(&(o, n)) = self.map.get(self.next) {
            if self.pos < o + n {
                break;
            }
            self.next += 1;
        }
        if self.pos >= self.real || buf.is_empty() {
            return Ok(0);
        }
        let region = self.map.get(self.next).copied();
        let want = |limit: u64| usize::try_from(limit.min(buf.len() as u64)).unwrap_or(buf.len());
        match region {
            Some((o, n)) if self.pos >= o => {
                let k = want(o + n - self.pos);
                let got = self.inner.read(buf.get_mut(..k).unwrap_or_default())?;
                if got == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("sparse member truncated at offset {}", self.pos),
                    ));
                }
                self.pos += got as u64;
                Ok(got)
            }
            other => {
                let until = other.map_or(self.real, |(o, _)| o.min(self.real));
                let k = want(until - self.pos);
                buf.get_mut(..k).unwrap_or_default().fill(0);
                self.pos += k as u64;
                Ok(k)
            }
        }
    }
}

/// Walks headers through `read(buf, offset)`, calling `visit` for each regular member
/// until it returns true (that member is returned).
fn walk(
    name: &str,
    read: &mut dyn FnMut(&mut [u8], u64) -> Result<bool>,
    visit: &mut dyn FnMut(&Member) -> bool,
) -> Result<Option<Member>> {
    let mut off = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut h = [0u8; 512];
    loop {
        if !read(&mut h, off)? || h.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if !header_checksum_ok(&h) {
            return Err(Error::corrupt(
                "tar",
                format!("'{name}': bad tar header checksum at offset {off}"),
                off,
            ));
        }
        let size = size_field(h.get(124..136).unwrap_or_default()).ok_or_else(|| {
            Error::corrupt(
                "tar",
                format!("'{name}': bad tar size field at offset {off}"),
                off + 124,
            )
        })?;
        let data = off + 512;
        let next = size
            .checked_next_multiple_of(512)
            .and_then(|s| data.checked_add(s))
            .ok_or_else(|| {
                Error::corrupt(
                    "tar",
                    format!("'{name}': tar member too large at offset {off}"),
                    off + 124,
                )
            })?;
        let flag = h.get(156).copied().unwrap_or(0);
        match flag {
            b'L' | b'x' => {
                let n = usize::try_from(size.min(1 << 20)).unwrap_or(0);
                let mut buf = vec![0u8; n];
                if !read(&mut buf, data)? {
                    return Err(Error::corrupt(
                        "tar",
                        format!("'{name}': truncated tar at offset {data}"),
                        data,
                    ));
                }
                if flag == b'L' {
                    long_name = Some(cstr(&buf));
                } else {
                    for rec in String::from_utf8_lossy(&buf).lines() {
                        let kv = rec.split_once(' ').map(|(_, kv)| kv).unwrap_or("");
                        if let Some(p) = kv.strip_prefix("path=") {
                            long_name = Some(p.to_string());
                        } else if let Some(s) = kv.strip_prefix("size=") {
                            pax_size = s.parse().ok();
                        }
                    }
                }
            }
            _ => {
                let mut n = cstr(h.get(..100).unwrap_or_default());
                let prefix = cstr(h.get(345..500).unwrap_or_default());
                if h.get(257..263) == Some(b"ustar\0") && !prefix.is_empty() {
                    n = format!("{prefix}/{n}");
                }
                let size = pax_size.take().unwrap_or(size);
                let (sparse, data) = if flag == b'S' {
                    let (map, real, d) = sparse_map(name, &h, data, read)?;
                    (Some((map, real)), d)
                } else {
                    (None, data)
                };
                let m = Member {
                    name: long_name.take().unwrap_or(n),
                    size,
                    offset: data,
                    regular: matches!(flag, 0 | b'0' | b'7' | b'S'),
                    sparse,
                };
                if m.regular && visit(&m) {
                    return Ok(Some(m));
                }
                let next = size
                    .checked_next_multiple_of(512)
                    .and_then(|s| data.checked_add(s))
                    .unwrap_or(next);
                off = next;
                continue;
            }
        }
        off = next;
    }
}

/// The rule for choosing a member: the named one, else the first disk image.
fn wanted(member: Option<&str>) -> impl FnMut(&Member) -> bool + '_ {
    move |m: &Member| match member {
        Some(w) => m.name == w || m.name.trim_start_matches("./") == w,
        None => {
            let lower = m.name.to_ascii_lowercase();
            DISK_EXTENSIONS.iter().any(|e| lower.ends_with(e))
        }
    }
}

fn not_found(name: &str, member: Option<&str>) -> Error {
    match member {
        Some(m) => Error::invalid(format!("'{name}': no member '{m}' in the archive")),
        None => Error::invalid(format!(
            "'{name}': no disk image member in the archive (name one with ARCHIVE#MEMBER)"
        )),
    }
}

/// Finds a member in a seekable archive.
pub fn find_in_storage(name: &str, s: &Arc<dyn Storage>, member: Option<&str>) -> Result<Member> {
    let len = s.len()?;
    let mut read = |buf: &mut [u8], off: u64| -> Result<bool> {
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > len) {
            return Ok(false);
        }
        s.read_exact_at(buf, off)?;
        Ok(true)
    };
    let m = walk(name, &mut read, &mut wanted(member))?.ok_or_else(|| not_found(name, member))?;
    if m.offset.checked_add(m.size).is_none_or(|e| e > len) {
        return Err(Error::corrupt(
            "tar",
            format!("'{name}': member '{}' is truncated", m.name),
            m.offset,
        ));
    }
    Ok(m)
}

/// Reads a stream up to the wanted member's data and returns the member and a reader of
/// exactly its bytes.
pub fn find_in_stream(
    name: &str,
    mut r: Box<dyn Read + Send>,
    member: Option<&str>,
) -> Result<(Member, Box<dyn Read + Send>)> {
    let mut pos = 0u64;
    let mut read = |buf: &mut [u8], off: u64| -> Result<bool> {
        // Forward only: skip to `off`, then fill `buf`.
        let skip = off
            .checked_sub(pos)
            .ok_or(Error::internal("tar reader went backwards"))?;
        let skipped = std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink())
            .map_err(|e| Error::io(format!("'{name}'"), e))?;
        pos += skipped;
        if skipped < skip {
            return Ok(false);
        }
        let mut n = 0;
        while n < buf.len() {
            match r.read(buf.get_mut(n..).unwrap_or_default()) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(Error::io(format!("'{name}'"), e)),
            }
        }
        pos += n as u64;
        Ok(n == buf.len())
    };
    let m = walk(name, &mut read, &mut wanted(member))?.ok_or_else(|| not_found(name, member))?;
    // The walk read the member's header and stopped at its data.
    let skip = m.offset.saturating_sub(pos);
    std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink())
        .map_err(|e| Error::io(format!("'{name}'"), e))?;
    let size = m.size;
    let stored: Box<dyn Read + Send> = Box::new(r.take(size));
    let reader: Box<dyn Read + Send> = match &m.sparse {
        Some((map, real)) => Box::new(SparseReader::new(stored, map.clone(), *real)),
        None => stored,
    };
    Ok((m, reader))
}

/// A read-only window `[offset, offset + len)` of another storage.
#[derive(Debug)]
pub struct SliceStorage {
    inner: Arc<dyn Storage>,
    offset: u64,
    len: u64,
}

impl SliceStorage {
    /// The bytes of `inner` from `offset`, `len` of them.
    pub fn new(inner: Arc<dyn Storage>, offset: u64, len: u64) -> Self {
        Self { inner, offset, len }
    }
}

impl Storage for SliceStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(Error::invalid(format!(
                "read of {} bytes at offset {offset} past the end of the member",
                buf.len()
            )));
        }
        self.inner.read_exact_at(buf, self.offset + offset)
    }
    diskimg_blockio::read_only_storage!();

    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }
}
