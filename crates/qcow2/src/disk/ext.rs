//! Header extensions (spec "Header extensions"): backing format, feature name table,
//! bitmaps, full-disk-encryption pointer, external data file; unknown ones are kept.

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Result};

/// End of the extension area.
const EXT_END: u32 = 0;
/// Backing file format name.
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub(crate) const EXT_FEATURES: u32 = 0x6803_f857;
/// Bitmaps extension.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The bitmaps extension (spec "Bitmaps extension").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// The parsed extensions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Extensions {
    /// 0xe2792aca: backing file format.
    pub backing_format: Option<String>,
    /// 0x6803f857: (type, bit, name) entries; type 0 incompatible, 1 compatible, 2 autoclear.
    pub features: Vec<(u8, u8, String)>,
    /// 0x23852875: bitmaps.
    pub bitmaps: Option<BitmapsExt>,
    /// 0x0537be77: (offset, length) of the encryption header.
    pub crypto: Option<(u64, u64)>,
    /// 0x44415441: external data file name.
    pub data_file: Option<String>,
    /// Every other extension, kept verbatim (type, data).
    pub unknown: Vec<(u32, Vec<u8>)>,
}

fn bad(what: &'static str, off: u64) -> Error {
    Error::corrupt("qcow2", what, off)
}

fn string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(data.get(..end).unwrap_or(&[])).into_owned()
}

impl Extensions {
    /// Parses the extension area of `buf` from `start` to `end` (both header offsets).
    pub(crate) fn parse(buf: &[u8], start: u64, end: u64) -> Result<Self> {
        let mut ext = Extensions::default();
        let mut off = start;
        while off < end {
            let o = usize::try_from(off).map_err(|_| bad("header extension", off))?;
            // qemu's one message for an extension (header or data) past the area.
            let too_large = || bad("Header extension too large", off);
            if end - off < 8 {
                return Err(too_large());
            }
            let ty = buf.be_u32(o).ok_or_else(too_large)?;
            let len = buf.be_u32(o + 4).ok_or_else(too_large)?;
            let data_off = off + 8;
            if u64::from(len) > end - data_off {
                return Err(too_large());
            }
            if ty == EXT_END {
                break;
            }
            let ds = o + 8;
            let data = ds
                .checked_add(usize::try_from(len).map_err(|_| bad("header extension", off))?)
                .and_then(|e| buf.get(ds..e))
                .ok_or_else(too_large)?;
            // A repeated extension replaces the earlier one, as in qemu.
            match ty {
                EXT_BACKING_FORMAT => {
                    if len > 1023 {
                        return Err(bad("ERROR: ext_backing_format: len too large", off));
                    }
                    ext.backing_format = Some(string(data));
                }
                EXT_FEATURES => {
                    // qemu reads the table into a zeroed buffer: a short last entry
                    // counts, padded with zeroes; an entry without a name ends it.
                    ext.features.clear();
                    for chunk in data.chunks(48) {
                        let t = chunk.first().copied().unwrap_or(0);
                        let b = chunk.get(1).copied().unwrap_or(0);
                        let name = string(chunk.get(2..).unwrap_or(&[]));
                        if name.is_empty() {
                            break;
                        }
                        ext.features.push((t, b, name));
                    }
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(bad("bitmaps extension has the wrong length", off));
                    }
                    ext.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: data.be_u32(0).unwrap_or(0),
                        directory_size: data.be_u64(8).unwrap_or(0),
                        directory_offset: data.be_u64(16).unwrap_or(0),
                    });
                }
                EXT_CRYPTO => {
                    if len != 16 {
                        return Err(bad("ERROR: crypto header extension: invalid length", off));
                    }
                    ext.crypto = Some((data.be_u64(0).unwrap_or(0), data.be_u64(8).unwrap_or(0)));
                }
                EXT_DATA_FILE => ext.data_file = Some(string(data)),
                _ => ext.unknown.push((ty, data.to_vec())),
            }
            off = data_off + u64::from(len).next_multiple_of(8);
        }
        Ok(ext)
    }

    /// The feature table's name for bit `bit` of table `ty`, if named.
    #[cfg(test)]
    pub(crate) fn feature_name(&self, ty: u8, bit: u8) -> Option<&str> {
        self.features
            .iter()
            .find(|(t, b, _)| *t == ty && *b == bit)
            .map(|(_, _, n)| n.as_str())
    }

    /// Serialises the extensions (in qemu's order, unknown ones last, then the end
    /// marker) for a header whose version is `version`.
    pub(crate) fn serialise(&self, version: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |ty: u32, data: &[u8]| {
            out.extend_from_slice(&ty.to_be_bytes());
            out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.backing_format {
            push(EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &self.data_file {
            push(EXT_DATA_FILE, d.as_bytes());
        }
        if let Some((o, l)) = self.crypto {
            let mut d = [0u8; 16];
            d.put_be_u64(0, o);
            d.put_be_u64(8, l);
            push(EXT_CRYPTO, &d);
        }
        if version >= 3 && !self.features.is_empty() {
            let mut d = vec![0u8; self.features.len() * 48];
            for (i, (t, b, n)) in self.features.iter().enumerate() {
                let name = n.as_bytes().get(..46.min(n.len())).unwrap_or(&[]);
                d.put(i * 48, &[*t, *b]);
                d.put(i * 48 + 2, name);
            }
            push(EXT_FEATURES, &d);
        }
        if let Some(b) = self.bitmaps {
            let mut d = [0u8; 24];
            d.put_be_u32(0, b.nb_bitmaps);
            d.put_be_u64(8, b.directory_size);
            d.put_be_u64(16, b.directory_offset);
            push(EXT_BITMAPS, &d);
        }
        for (ty, data) in &self.unknown {
            push(*ty, data);
        }
        out.extend_from_slice(&[0u8; 8]);
        out
    }

    /// The feature name table qemu 10 writes into v3 headers — only with clusters of
    /// more than 4 KiB: qemu leaves it out of 512 B to 4 KiB cluster images (seen for
    /// create and for `amend -o compat=1.1`; our files are byte-identical to qemu's).
    pub(crate) fn qemu_feature_table_for(cluster_size: u64) -> Vec<(u8, u8, String)> {
        if cluster_size > 4096 {
            Self::qemu_feature_table()
        } else {
            Vec::new()
        }
    }

    /// The feature name table qemu 10 writes.
    pub(crate) fn qemu_feature_table() -> Vec<(u8, u8, String)> {
        [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ]
        .into_iter()
        .map(|(t, b, n)| (t, b, n.to_string()))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_unknown() {
        let ext = Extensions {
            backing_format: Some("raw".into()),
            features: Extensions::qemu_feature_table(),
            unknown: vec![(0x1234_5678, vec![1, 2, 3])],
            ..Extensions::default()
        };
        let buf = ext.serialise(3);
        let back = Extensions::parse(&buf, 0, buf.len() as u64).unwrap();
        assert_eq!(back, ext);
        assert_eq!(back.feature_name(0, 4), Some("extended L2 entries"));
        let mut bad = buf.clone();
        bad[7] = 0xff; // length beyond the end
        let e = Extensions::parse(&bad, 0, bad.len() as u64).unwrap_err();
        assert!(e.to_string().contains("Header extension too large"), "{e}");
        // A header cut inside an extension header: the same message, as qemu (iotest 080).
        let e = Extensions::parse(&buf, 0, 4).unwrap_err();
        assert!(e.to_string().contains("Header extension too large"), "{e}");
    }

    /// A repeated extension replaces the earlier one, as qemu reads them (iotest 114
    /// adds a second backing-format extension).
    #[test]
    fn repeated_extension_last_wins() {
        let first = Extensions {
            backing_format: Some("raw".into()),
            ..Extensions::default()
        }
        .serialise(3);
        let second = Extensions {
            backing_format: Some("foo".into()),
            ..Extensions::default()
        }
        .serialise(3);
        let mut buf = first[..first.len() - 8].to_vec();
        buf.extend_from_slice(&second);
        let back = Extensions::parse(&buf, 0, buf.len() as u64).unwrap();
        assert_eq!(back.backing_format.as_deref(), Some("foo"));
    }
}
