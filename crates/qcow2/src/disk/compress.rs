//! Compressed clusters (spec "Compressed Clusters Descriptor"): zlib is raw deflate with a
//! 4 KiB window (qemu uses windowBits -12), zstd is one or more frames.

use diskimg_blockio::{Error, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Header compression_type 0.
pub(crate) const ZLIB: u8 = 0;
/// Header compression_type 1.
pub(crate) const ZSTD: u8 = 1;

fn bad(off: u64) -> Error {
    Error::corrupt("qcow2", "compressed cluster does not decompress", off)
}

/// Inflates `input` into exactly `out.len()` bytes (a whole cluster). `host` is only
/// used in error messages.
pub(crate) fn decompress(ty: u8, input: &[u8], out: &mut [u8], host: u64) -> Result<()> {
    match ty {
        ZLIB => {
            let mut d = Decompress::new(false);
            let st = d
                .decompress(input, out, FlushDecompress::Finish)
                .map_err(|_| bad(host))?;
            // qemu accepts a stream that filled the cluster even if it did not end.
            let produced = usize::try_from(d.total_out()).map_err(|_| bad(host))?;
            if produced != out.len() && st != Status::StreamEnd {
                return Err(bad(host));
            }
            if produced != out.len() {
                return Err(bad(host));
            }
            Ok(())
        }
        ZSTD => {
            let mut dec = zstd::stream::raw::Decoder::new().map_err(|_| bad(host))?;
            let mut inbuf = zstd::stream::raw::InBuffer::around(input);
            let mut outbuf = zstd::stream::raw::OutBuffer::around(out);
            use zstd::stream::raw::Operation;
            loop {
                let before_in = inbuf.pos();
                let before_out = outbuf.pos();
                dec.run(&mut inbuf, &mut outbuf).map_err(|_| bad(host))?;
                if outbuf.pos() == outbuf.capacity() {
                    return Ok(());
                }
                if inbuf.pos() == before_in && outbuf.pos() == before_out {
                    return Err(bad(host));
                }
            }
        }
        _ => Err(bad(host)),
    }
}

/// The deflate level of zlib clusters. qemu uses zlib's default (6); level 3 (zlib-rs's
/// fast strategy) takes 18% less CPU for 1% more output on real images (ext4 image of
/// /usr/share: 0.4032 against 0.3991 of the input, 5.5 s against 6.7 s of CPU for
/// 600 MiB; docs/benchmarks.md). The streams are ordinary raw deflate with a 4 KiB window:
/// any zlib inflates them.
pub(crate) const ZLIB_LEVEL: u32 = 3;

/// Compresses one cluster; `None` when the result would not be smaller than the input
/// (qemu then stores the cluster uncompressed).
pub(crate) fn compress(ty: u8, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = input.len().saturating_sub(1);
    match ty {
        ZLIB => {
            let mut c = Compress::new_with_window_bits(Compression::new(ZLIB_LEVEL), false, 12);
            let mut out = vec![0u8; input.len()];
            let st = c
                .compress(input, &mut out, FlushCompress::Finish)
                .map_err(|_| Error::invalid("deflate failed"))?;
            let n = usize::try_from(c.total_out()).unwrap_or(usize::MAX);
            if st != Status::StreamEnd || n > limit {
                return Ok(None);
            }
            out.truncate(n);
            Ok(Some(out))
        }
        ZSTD => {
            let out = zstd::bulk::compress(input, 0).map_err(|_| Error::invalid("zstd failed"))?;
            Ok((out.len() <= limit).then_some(out))
        }
        _ => Err(Error::unsupported("qcow2", "unknown compression type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = u8::try_from(i / 100 % 256).unwrap();
        }
        for ty in [ZLIB, ZSTD] {
            let c = compress(ty, &data).unwrap().unwrap();
            let mut padded = c.clone();
            padded.extend_from_slice(&[0u8; 700]);
            let mut out = vec![0u8; 65536];
            decompress(ty, &padded, &mut out, 0).unwrap();
            assert_eq!(out, data);
            assert!(decompress(ty, &c[..c.len() / 2], &mut out, 0).is_err());
        }
    }
}
