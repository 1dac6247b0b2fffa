//! Wrapped inputs: gzip (multi-member), xz (multi-threaded where the file has several
//! blocks, concatenated streams), zstd (multi-frame) and bzip2 (multi-stream), detected
//! by their magic bytes and decoded on the fly.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A compression wrapper around an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// gzip (RFC 1952), several members allowed (pigz, `cat a.gz b.gz`).
    Gzip,
    /// xz (.xz container, LZMA2).
    Xz,
    /// Zstandard frames.
    Zstd,
    /// bzip2 streams.
    Bzip2,
}

impl Codec {
    /// The usual name (`gzip`, `xz`, `zstd`, `bzip2`).
    pub fn name(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Xz => "xz",
            Codec::Zstd => "zstd",
            Codec::Bzip2 => "bzip2",
        }
    }

    /// Recognises a wrapper from the first bytes of the input.
    pub fn detect(head: &[u8]) -> Option<Codec> {
        match head {
            [0x1f, 0x8b, 0x08, ..] => Some(Codec::Gzip),
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Some(Codec::Xz),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Codec::Zstd),
            [
                b'B',
                b'Z',
                b'h',
                b'1'..=b'9',
                0x31,
                0x41,
                0x59,
                0x26,
                0x53,
                0x59,
                ..,
            ] => Some(Codec::Bzip2),
            // An empty bzip2 stream (end-of-stream marker right after the header).
            [
                b'B',
                b'Z',
                b'h',
                b'1'..=b'9',
                0x17,
                0x72,
                0x45,
                0x38,
                0x50,
                0x90,
                ..,
            ] => Some(Codec::Bzip2),
            _ => None,
        }
    }

    /// A decoder reading compressed bytes from `r`. `threads` bounds xz's decoder
    /// threads (blocks of a multi-block file are decoded in parallel).
    pub fn decoder(
        self,
        r: Box<dyn Read + Send>,
        threads: u32,
    ) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Codec::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
                std::io::BufReader::with_capacity(1 << 20, r),
            )),
            Codec::Xz => {
                let stream = liblzma::stream::MtStreamBuilder::new()
                    .threads(threads.max(1))
                    .memlimit_threading(64 << 20)
                    .memlimit_stop(u64::MAX)
                    .decoder()
                    .map_err(std::io::Error::other)?;
                Box::new(liblzma::read::XzDecoder::new_stream(
                    std::io::BufReader::with_capacity(1 << 20, r),
                    stream,
                ))
            }
            Codec::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
            Codec::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(
                std::io::BufReader::with_capacity(1 << 20, r),
            )),
        })
    }
}

/// Counts the bytes read through it (the compressed input: progress, error offsets).
pub struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R> CountingReader<R> {
    /// Wraps `inner`, adding to `count`.
    pub fn new(inner: R, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Names the compressed offset in decoder errors (`corrupt deflate stream` alone does
/// not say where).
pub struct DecodeErrors {
    inner: Box<dyn Read + Send>,
    codec: Codec,
    input_pos: Arc<AtomicU64>,
}

impl DecodeErrors {
    /// Wraps a decoder of `codec` whose input is counted in `input_pos`.
    pub fn new(inner: Box<dyn Read + Send>, codec: Codec, input_pos: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            codec,
            input_pos,
        }
    }
}

impl Read for DecodeErrors {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            let at = self.input_pos.load(Ordering::Relaxed);
            let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "truncated".to_string()
            } else {
                format!("corrupt ({e})")
            };
            std::io::Error::other(format!(
                "{} data {what} near compressed offset {at}",
                self.codec.name()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic() {
        assert_eq!(Codec::detect(&[0x1f, 0x8b, 8, 0]), Some(Codec::Gzip));
        assert_eq!(Codec::detect(b"\xfd7zXZ\0\0"), Some(Codec::Xz));
        assert_eq!(
            Codec::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Some(Codec::Zstd)
        );
        assert_eq!(Codec::detect(b"BZh91AY&SY"), Some(Codec::Bzip2));
        assert_eq!(Codec::detect(b"BZh9xxxxxx"), None);
        assert_eq!(Codec::detect(b"QFI\xfb"), None);
        assert_eq!(Codec::detect(&[]), None);
    }
}
