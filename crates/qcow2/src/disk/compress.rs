//! Compressed clusters (spec "Compressed Clusters Descriptor"): zlib is raw deflate with a
//! 4 KiB window (qemu uses windowBits -12), zstd is one or more frames.

use diskimg_blockio::{Error, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::errors::internal;

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
        ZLIB => INFLATE.with_borrow_mut(|slot| {
            // One inflater per thread, reset per cluster (as for deflate below): a fresh
            // one per cluster allocated its state and window every time, and with
            // every convert worker doing so glibc's per-thread arenas held twice the
            // memory the conversion needed.
            let d = slot.get_or_insert_with(|| Decompress::new(false));
            d.reset(false);
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
        }),
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

/// The deflate level of zlib clusters. qemu uses zlib's default (6). On 348 MiB of data
/// clusters of an ext4 image of /usr/share (`cargo bench --bench compress_image`,
/// docs/benchmarks.md), one core: level 6 took 3.24 s for 0.3872 of the input, level 3
/// (lazy "medium" matching) 2.55 s for 0.3915, level 2 (greedy, chains of 4) 2.22 s for
/// 0.4017 (with the incompressible pre-check; 2.47 s at level 3); level 1
/// (deflate_quick) grows the output by 23%. Level 2 is what gets `convert -c` to 3x
/// qemu-img's speed while the image stays within 5% of qemu's size (1.040 in
/// `benches/compare-qemu.sh`; level 3: 1.015 at 2.6-3.0x in CPU time). The streams are
/// ordinary raw deflate with a 4 KiB window: any zlib inflates them.
pub(crate) const ZLIB_LEVEL: u32 = 2;

/// Compresses one cluster; `None` when the result would not be smaller than the input
/// (qemu then stores the cluster uncompressed), or when the cluster
/// [looks incompressible](diskimg_blockio::looks_incompressible) (already-compressed or
/// encrypted data: deflate would spend its time for nothing).
pub(crate) fn compress(ty: u8, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = input.len().saturating_sub(1);
    if diskimg_blockio::looks_incompressible(input) {
        return Ok(None);
    }
    match ty {
        ZLIB => DEFLATE.with_borrow_mut(|slot| {
            // One compressor per thread, reset per cluster: a fresh one allocates and
            // clears its window and hash tables every time.
            let c = slot.get_or_insert_with(|| {
                Compress::new_with_window_bits(Compression::new(ZLIB_LEVEL), false, 12)
            });
            c.reset();
            #[allow(clippy::disallowed_methods, reason = "sized by a buffer in memory")]
            let mut out = Vec::with_capacity(input.len());
            let st = c
                .compress_vec(input, &mut out, FlushCompress::Finish)
                .map_err(|_| internal("deflate failed"))?;
            if st != Status::StreamEnd || out.len() > limit {
                return Ok(None);
            }
            Ok(Some(out))
        }),
        ZSTD => {
            let out = zstd::bulk::compress(input, 0).map_err(|_| internal("zstd failed"))?;
            Ok((out.len() <= limit).then_some(out))
        }
        _ => Err(Error::unsupported("qcow2", "unknown compression type")),
    }
}

thread_local! {
    /// This thread's raw-inflate state.
    static INFLATE: std::cell::RefCell<Option<Decompress>> = const { std::cell::RefCell::new(None) };
    /// This thread's raw-deflate compressor (4 KiB window, [`ZLIB_LEVEL`]).
    static DEFLATE: std::cell::RefCell<Option<Compress>> = const { std::cell::RefCell::new(None) };
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

    #[test]
    fn incompressible_clusters_are_left_plain() {
        let random = diskimg_testutil::pattern(5, 65536);
        for ty in [ZLIB, ZSTD] {
            assert_eq!(compress(ty, &random).unwrap(), None);
        }
        // The compressor of this thread is reused: a compressible cluster after it
        // still round-trips.
        let text: Vec<u8> = b"qcow2 compressed cluster "
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        for _ in 0..2 {
            let c = compress(ZLIB, &text).unwrap().unwrap();
            let mut out = vec![0u8; 65536];
            decompress(ZLIB, &c, &mut out, 0).unwrap();
            assert_eq!(out, text);
        }
    }
}
