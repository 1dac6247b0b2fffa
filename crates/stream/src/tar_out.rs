//! Writing tar archives front to back: member headers in POSIX ustar (what OVF
//! requires) or GNU `oldgnu` form (what `tar --format=oldgnu` writes; GCP's import
//! layout), GNU sparse members (`S`, with extension headers) whose holes are not
//! stored, sizes of 8 GiB and more in GNU base-256, and the end-of-archive blocks.

use std::io::Write;

use diskimg_blockio::{BlockDevice, Error, Result, block_status};

/// Tar block size.
pub(crate) const BLOCK: u64 = 512;
/// Bytes per read of member data.
const CHUNK: u64 = 4 << 20;
/// Holes shorter than this are stored as data (fewer sparse entries; the zeroes
/// compress to nothing).
const MIN_HOLE: u64 = 64 << 10;

/// The header dialect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TarFormat {
    /// POSIX ustar (`ustar\0` `00`).
    Ustar,
    /// GNU before POSIX (`ustar  \0`), which sparse members need.
    OldGnu,
}

/// A member to write.
#[derive(Clone, Debug)]
pub struct TarEntry {
    /// Path in the archive (at most 100 bytes).
    pub name: String,
    /// Bytes stored after the header(s) (for a sparse member, the data regions').
    pub size: u64,
    /// Modification time (seconds since the epoch).
    pub mtime: u64,
    /// For a GNU sparse member: the data regions (offset, length) and the file length.
    pub sparse: Option<(Vec<(u64, u64)>, u64)>,
}

/// Writes `v` into `field` as zero-padded octal with a NUL, or in GNU base-256 when it
/// does not fit.
fn number(field: &mut [u8], v: u64) {
    let n = field.len();
    let octal = format!("{v:0width$o}", width = n - 1);
    if octal.len() < n {
        field.fill(0);
        if let Some(f) = field.get_mut(..n - 1) {
            f.copy_from_slice(octal.as_bytes());
        }
        return;
    }
    field.fill(0);
    let be = v.to_be_bytes();
    if let Some(f) = field.get_mut(n - 8..) {
        f.copy_from_slice(&be);
    }
    if let Some(b) = field.first_mut() {
        *b = 0x80;
    }
}

fn put(h: &mut [u8], at: usize, v: &[u8]) {
    if let Some(f) = h.get_mut(at..at + v.len()) {
        f.copy_from_slice(v);
    }
}

fn field(h: &mut [u8], at: usize, len: usize) -> &mut [u8] {
    h.get_mut(at..at + len).unwrap_or_default()
}

/// Sets the header checksum (bytes 148..156).
fn checksum(h: &mut [u8]) {
    field(h, 148, 8).fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    put(h, 148, s.as_bytes());
}

/// The header block(s) of `e`: one block, plus GNU sparse extension blocks.
pub fn header(e: &TarEntry, format: TarFormat) -> Result<Vec<u8>> {
    if e.name.is_empty() || e.name.len() > 100 {
        return Err(Error::invalid("tar member name must have 1 to 100 bytes"));
    }
    let mut h = vec![0u8; 512];
    put(&mut h, 0, e.name.as_bytes());
    number(field(&mut h, 100, 8), 0o644);
    number(field(&mut h, 108, 8), 0);
    number(field(&mut h, 116, 8), 0);
    number(field(&mut h, 124, 12), e.size);
    number(field(&mut h, 136, 12), e.mtime);
    put(&mut h, 265, b"root");
    put(&mut h, 297, b"root");
    match format {
        TarFormat::Ustar => put(&mut h, 257, b"ustar\x0000"),
        TarFormat::OldGnu => put(&mut h, 257, b"ustar  \0"),
    }
    let mut blocks = Vec::new();
    match &e.sparse {
        None => put(&mut h, 156, b"0"),
        Some((map, real)) => {
            if format != TarFormat::OldGnu {
                return Err(Error::invalid("sparse members need the oldgnu format"));
            }
            put(&mut h, 156, b"S");
            number(field(&mut h, 483, 12), *real);
            let (first, rest) = map.split_at(map.len().min(4));
            for (i, (off, len)) in first.iter().enumerate() {
                number(field(&mut h, 386 + i * 24, 12), *off);
                number(field(&mut h, 398 + i * 24, 12), *len);
            }
            let chunks: Vec<_> = rest.chunks(21).collect();
            if let Some(b) = h.get_mut(482) {
                *b = u8::from(!chunks.is_empty());
            }
            for (c, chunk) in chunks.iter().enumerate() {
                let mut x = vec![0u8; 512];
                for (i, (off, len)) in chunk.iter().enumerate() {
                    number(field(&mut x, i * 24, 12), *off);
                    number(field(&mut x, i * 24 + 12, 12), *len);
                }
                if let Some(b) = x.get_mut(504) {
                    *b = u8::from(c + 1 < chunks.len());
                }
                blocks.extend_from_slice(&x);
            }
        }
    }
    checksum(&mut h);
    h.extend_from_slice(&blocks);
    Ok(h)
}

/// Zero bytes that pad `len` bytes of member data to a block.
pub fn padding(len: u64) -> usize {
    usize::try_from(len.next_multiple_of(BLOCK) - len).unwrap_or(0)
}

/// The end of an archive that is `written` bytes long so far: two zero blocks, then
/// zeroes up to a whole record of 20 blocks (GNU tar's default blocking).
pub fn end_of_archive(written: u64) -> Vec<u8> {
    let end = (written + 2 * BLOCK).next_multiple_of(20 * BLOCK);
    vec![0u8; usize::try_from(end - written).unwrap_or(1024)]
}

/// The data regions of `dev` (holes of at least 64 KiB left out, as far as its map
/// knows them), and whether there is any hole at all.
pub fn data_regions(dev: &dyn BlockDevice) -> Result<Vec<(u64, u64)>> {
    let size = dev.virtual_size();
    let mut map: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let st = block_status(dev, pos, size - pos)?;
        let end = pos + st.length;
        let hole = st.zero && (st.length >= MIN_HOLE || end == size);
        if !hole {
            match map.last_mut() {
                // Data again after a short hole, or adjoining data: one region.
                Some((o, l)) if pos - (*o + *l) < MIN_HOLE => *l = end - *o,
                _ => map.push((pos, st.length)),
            }
        }
        pos = end;
    }
    Ok(map)
}

/// Writes the member `name` holding the guest bytes of `dev` to `out`, followed by
/// padding; returns the bytes written. With `sparse`, a sparse member when the map has
/// holes (the map is walked first: the header lists the data regions); without it, a
/// regular member, for sources that can only be walked once (a forward-only stream).
/// Zero ranges are written from a zero buffer without being read. `progress` gets guest
/// offsets.
pub fn write_device_member(
    dev: &dyn BlockDevice,
    out: &mut dyn Write,
    name: &str,
    mtime: u64,
    sparse: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let size = dev.virtual_size();
    let map = if sparse {
        data_regions(dev)?
    } else {
        vec![(0, size)]
    };
    let stored: u64 = map.iter().map(|(_, l)| l).sum();
    let sparse = stored < size;
    let mut sparse_map = map.clone();
    if sparse && map.last().is_none_or(|(o, l)| o + l < size) {
        // GNU tar ends the map of a file ending in a hole with an empty region at its end.
        sparse_map.push((size, 0));
    }
    let e = TarEntry {
        name: name.to_string(),
        size: stored,
        mtime,
        sparse: sparse.then_some((sparse_map, size)),
    };
    let werr = |e: std::io::Error| Error::io("could not write the output", e);
    let h = header(&e, TarFormat::OldGnu)?;
    out.write_all(&h).map_err(werr)?;
    let mut buf = Vec::new();
    for (off, len) in map {
        let mut pos = off;
        while pos < off + len {
            let st = block_status(dev, pos, (off + len - pos).min(CHUNK))?;
            let n = st.length.clamp(1, CHUNK);
            buf.resize(usize::try_from(n).unwrap_or(0), 0);
            if st.zero {
                buf.fill(0);
            } else {
                dev.read_at(&mut buf, pos)?;
            }
            out.write_all(&buf).map_err(werr)?;
            pos += n;
            progress(pos);
        }
    }
    out.write_all(&vec![0u8; padding(stored)]).map_err(werr)?;
    progress(size);
    Ok(h.len() as u64 + stored + padding(stored) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_octal_or_base256() {
        let mut f = [0u8; 12];
        number(&mut f, 0o1234);
        assert_eq!(&f, b"00000001234\0");
        number(&mut f, 8 << 30);
        assert_eq!(f[0], 0x80);
        assert_eq!(&f[4..], &(8u64 << 30).to_be_bytes());
    }

    #[test]
    fn headers_parse_back() {
        let e = TarEntry {
            name: "disk.raw".into(),
            size: 4096,
            mtime: 1,
            sparse: Some(((0..30).map(|i| (i * 8192, 512)).collect(), 1 << 20)),
        };
        let h = header(&e, TarFormat::OldGnu).unwrap();
        assert_eq!(h.len(), 512 * 3);
        assert!(crate::tar::is_tar(&h[..512]));
        assert_eq!(h[156], b'S');
        assert_eq!(h[482], 1);
        assert_eq!(h[512 + 504], 1);
        assert_eq!(h[1024 + 504], 0);
        assert!(header(&e, TarFormat::Ustar).is_err());
    }
}
