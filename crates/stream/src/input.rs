//! Opening a source that is not (only) a local image file: `-`, a URL, a wrapped
//! (compressed) file, a member of a tar/OVA archive, or any stack of those
//! (`https://…/disk.tar.gz#disk.raw`).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use diskimg_blockio::{Error, FileStorage, Result, Storage};

use crate::codec::{Codec, CountingReader, DecodeErrors};
use crate::forward::{ForwardStorage, StorageReader};
use crate::http::{HttpOptions, HttpSource};
use crate::tar::{SliceStorage, SparseReader, find_in_storage, find_in_stream, is_tar};

/// How [`open`] opens sources.
#[derive(Clone, Debug, Default)]
pub struct InputOptions {
    /// HTTP settings (headers, retries, readahead).
    pub http: HttpOptions,
    /// Decoder threads (xz).
    pub threads: u32,
    /// The archive member to read (also given as `ARCHIVE#MEMBER`).
    pub member: Option<String>,
}

/// An opened source.
pub struct Input {
    /// The image bytes: random access, or forward-only (see [`Input::forward`]).
    pub storage: Arc<dyn Storage>,
    /// Set when the bytes can only be read front to back.
    pub forward: Option<Arc<ForwardStorage>>,
    /// The wrapper that was decoded, if any.
    pub codec: Option<Codec>,
    /// The archive member read, if any.
    pub member: Option<String>,
    /// Bytes read from the underlying input so far (compressed bytes, for progress).
    pub input_read: Arc<AtomicU64>,
    /// The underlying input's length, when known.
    pub input_len: Option<u64>,
}

enum Layer {
    Seek(Arc<dyn Storage>),
    Stream(Box<dyn Read + Send>, Option<u64>),
}

/// True for arguments that are never a plain file name: `-` and URLs.
pub fn is_stream_spec(spec: &str) -> bool {
    spec == "-" || spec.starts_with("http://") || spec.starts_with("https://")
}

/// Reads up to 512 bytes of a layer without losing them.
fn sniff(layer: Layer) -> Result<(Layer, Vec<u8>)> {
    match layer {
        Layer::Seek(s) => {
            let n = s.len()?.min(512);
            let mut head = vec![0u8; usize::try_from(n).unwrap_or(0)];
            // Leaves the page cache as it was: a plain image file is opened again
            // the usual way, and its map must not change because it was sniffed.
            s.peek_exact_at(&mut head, 0)?;
            Ok((Layer::Seek(s), head))
        }
        Layer::Stream(mut r, len) => {
            let mut head = Vec::new();
            (&mut r)
                .take(512)
                .read_to_end(&mut head)
                .map_err(|e| Error::io("reading the input", e))?;
            let r: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(head.clone()).chain(r));
            Ok((Layer::Stream(r, len), head))
        }
    }
}

/// The base layer of `spec` and the member named in it.
fn base(
    spec: &str,
    opts: &InputOptions,
    count: &Arc<AtomicU64>,
) -> Result<(Layer, Option<String>, Option<u64>)> {
    if spec == "-" {
        use std::os::fd::AsFd;
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("could not use stdin", e))?;
        let file = std::fs::File::from(fd);
        if file.metadata().is_ok_and(|m| m.is_file()) {
            let s: Arc<dyn Storage> = Arc::new(FileStorage::from_file(file, true));
            let len = s.len()?;
            return Ok((Layer::Seek(s), None, Some(len)));
        }
        let r = CountingReader::new(file, count.clone());
        return Ok((Layer::Stream(Box::new(r), None), None, None));
    }
    if is_stream_spec(spec) {
        let (url, member) = match spec.split_once('#') {
            Some((u, m)) => (u, Some(m.to_string())),
            None => (spec, None),
        };
        return Ok(match HttpSource::open(url, &opts.http)? {
            HttpSource::Ranges(s) => {
                let len = s.len()?;
                (Layer::Seek(Arc::new(*s)), member, Some(len))
            }
            HttpSource::Stream(r, len) => (
                Layer::Stream(Box::new(CountingReader::new(r, count.clone())), len),
                member,
                len,
            ),
        });
    }
    let (path, member) = match spec.rsplit_once('#') {
        Some((p, m)) if !Path::new(spec).exists() && Path::new(p).exists() => {
            (p, Some(m.to_string()))
        }
        _ => (spec, None),
    };
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(path, true)?);
    let len = s.len()?;
    Ok((Layer::Seek(s), member, Some(len)))
}

/// True when `spec` is a local file that cannot be opened as one (missing, not
/// readable): the caller's usual open reports that in its own words.
fn plain_unopenable(spec: &str) -> bool {
    if is_stream_spec(spec) {
        return false;
    }
    let path = match spec.rsplit_once('#') {
        Some((p, _)) if !Path::new(spec).exists() && Path::new(p).exists() => p,
        _ => spec,
    };
    std::fs::File::open(path).is_err()
}

/// Opens `spec` if it needs more than a plain file open: `-`, a URL, a compressed file,
/// a tar/OVA archive or `ARCHIVE#MEMBER`. `None` means a plain image file, to be
/// opened the usual way (with its backing chain).
pub fn open(spec: &str, opts: &InputOptions) -> Result<Option<Input>> {
    if plain_unopenable(spec) {
        return Ok(None);
    }
    let count = Arc::new(AtomicU64::new(0));
    let (layer, member, input_len) = base(spec, opts, &count)?;
    let member = member.or_else(|| opts.member.clone());
    let (mut layer, mut head) = sniff(layer)?;
    let codec = Codec::detect(&head);
    if codec.is_none() && member.is_none() && !is_tar(&head) && !is_stream_spec(spec) {
        return Ok(None);
    }
    if let Some(c) = codec {
        let raw: Box<dyn Read + Send> = match layer {
            Layer::Seek(s) => {
                let len = s.len()?;
                Box::new(CountingReader::new(
                    StorageReader::new(s, len),
                    count.clone(),
                ))
            }
            Layer::Stream(r, _) => r,
        };
        let dec = c
            .decoder(raw, opts.threads.max(1))
            .map_err(|e| Error::io(format!("'{spec}'"), e))?;
        (layer, head) = sniff(Layer::Stream(
            Box::new(DecodeErrors::new(dec, c, count.clone())),
            None,
        ))?;
    }
    let mut chosen = None;
    if member.is_some() || is_tar(&head) {
        layer = match layer {
            Layer::Seek(s) => {
                let m = find_in_storage(spec, &s, member.as_deref())?;
                let slice: Arc<dyn Storage> = Arc::new(SliceStorage::new(s, m.offset, m.size));
                chosen = Some(m.name);
                match m.sparse {
                    // A GNU sparse member is expanded front to back.
                    Some((map, real)) => {
                        let stored = Box::new(StorageReader::new(slice, m.size));
                        Layer::Stream(Box::new(SparseReader::new(stored, map, real)), Some(real))
                    }
                    None => Layer::Seek(slice),
                }
            }
            Layer::Stream(r, _) => {
                let (m, r) = find_in_stream(spec, r, member.as_deref())?;
                chosen = Some(m.name);
                let len = m.sparse.as_ref().map_or(m.size, |(_, real)| *real);
                Layer::Stream(r, Some(len))
            }
        };
    }
    let (storage, forward): (Arc<dyn Storage>, _) = match layer {
        Layer::Seek(s) => (s, None),
        Layer::Stream(r, len) => {
            let f = Arc::new(ForwardStorage::new(spec, r, len));
            (f.clone(), Some(f))
        }
    };
    Ok(Some(Input {
        storage,
        forward,
        codec,
        member: chosen,
        input_read: count,
        input_len,
    }))
}
