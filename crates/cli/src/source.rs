//! Sources that are not local image files, for every verb that only reads (`info`,
//! `map`, `compare`, `measure`, `checksum`, `convert`): `-`, `http(s)://` URLs,
//! gzip/xz/zstd/bzip2-wrapped files, tar/OVA members (see `diskimg::stream`).
//!
//! Such a source is opened on its storage without a backing chain. A forward-only
//! source (a pipe, a decoded stream, a server without ranges) is registered here so
//! `convert` and `checksum` can go through it in one pass; the other verbs need its
//! length first, so a raw stream of unknown length is read to its end before they
//! look at it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, anyhow};
use diskimg::stream::{ForwardStorage, Input, InputOptions, SliceStorage};
use diskimg::{Format, Image};

/// Global options for sources that are not files.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct SourceArgs {
    /// Extra HTTP request header for URL sources (`Name: value`, e.g. a bearer token);
    /// may repeat.
    #[arg(long = "header", global = true, value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// The member of a tar/OVA source to read (default: `ARCHIVE#MEMBER`, else the
    /// first disk image in the archive).
    #[arg(long = "member", global = true)]
    member: Option<String>,
}

static OPTIONS: OnceLock<InputOptions> = OnceLock::new();

/// A source opened through this module.
pub(crate) struct Opened {
    pub(crate) name: String,
    pub(crate) forward: Option<Arc<ForwardStorage>>,
    pub(crate) input: Arc<Input>,
}

static OPENED: Mutex<Vec<Arc<Opened>>> = Mutex::new(Vec::new());

/// Records the global options (once, before any verb runs).
pub(crate) fn init(a: &SourceArgs) -> Result<()> {
    let mut o = InputOptions {
        threads: std::thread::available_parallelism()
            .map_or(2, |n| u32::try_from(n.get()).unwrap_or(2)),
        member: a.member.clone(),
        ..InputOptions::default()
    };
    for h in &a.headers {
        let kv = diskimg::stream::parse_header(h)
            .ok_or_else(|| anyhow!("Invalid --header '{h}' (expected 'Name: value')"))?;
        o.http.headers.push(kv);
    }
    let _ = OPTIONS.set(o);
    Ok(())
}

/// The source named `name`, if it was opened here.
pub(crate) fn opened(name: &str) -> Option<Arc<Opened>> {
    OPENED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .rev()
        .find(|o| o.name == name)
        .cloned()
}

/// Opens `file` when it is not a plain image file; `None` otherwise. With
/// `need_length`, a raw stream of unknown length is read to its end first.
pub(crate) fn open_special(
    file: &str,
    format: Option<Format>,
    need_length: bool,
) -> Result<Option<Image>> {
    // `--image-opts` option strings name files the usual way.
    if crate::secrets::resolve(file, format)?.0 != file {
        return Ok(None);
    }
    let opts = OPTIONS.get().cloned().unwrap_or_default();
    let Some(input) =
        diskimg::stream::open(file, &opts).with_context(|| format!("Could not open '{file}'"))?
    else {
        return Ok(None);
    };
    let format = match format {
        Some(f) => f,
        None => probe(&input)?,
    };
    if let Some(f) = &input.forward
        && format == Format::Raw
    {
        // A raw image is read front to back once: its head need not be kept.
        f.stop_growing_head();
        if need_length && f.known_len().is_none() {
            f.drain_to_end()
                .with_context(|| format!("Could not read '{file}'"))?;
        }
    }
    let device = match forward_vmdk(file, &input, format)? {
        Some(d) => d,
        None => diskimg::open_storage(input.storage.clone(), Some(format), true)
            .with_context(|| format!("Could not open '{file}'"))?,
    };
    let forward = input.forward.clone();
    OPENED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::new(Opened {
            name: file.to_string(),
            forward,
            input: Arc::new(input),
        }));
    Ok(Some(Image::from_device(
        device,
        format,
        PathBuf::from(file),
        file.to_string(),
    )))
}

/// A stream-optimized VMDK whose grain directory is in its footer, over a forward-only
/// source: read front to back by walking its grain markers (the driver would look for
/// the footer first, past everything it needs).
fn forward_vmdk(
    file: &str,
    input: &Input,
    format: Format,
) -> Result<Option<Arc<dyn diskimg::BlockDevice>>> {
    use diskimg::Storage;
    let Some(f) = input.forward.as_ref().filter(|_| format == Format::Vmdk) else {
        return Ok(None);
    };
    let mut head = [0u8; 512];
    if f.read_exact_at(&mut head, 0).is_err() || !diskimg::stream::is_forward_stream(&head) {
        return Ok(None);
    }
    let dev = diskimg::stream::ForwardStreamDevice::open(file, Box::new(f.sequential()))
        .with_context(|| format!("Could not open '{file}'"))?;
    Ok(Some(Arc::new(dev)))
}

/// Probes a source; a forward-only one only from its head (a probe reading the end,
/// like VHD's footer, would consume the whole stream).
fn probe(input: &Input) -> Result<Format> {
    if input.forward.is_none() {
        return Ok(diskimg::probe(input.storage.as_ref()));
    }
    let len = input.storage.len()?.min(64 << 10);
    let head = SliceStorage::new(input.storage.clone(), 0, len);
    let f = diskimg::probe(&head);
    Ok(if f == Format::Vpc { Format::Raw } else { f })
}

/// The guest length of a raw stream source, once known (its device reports a
/// provisional size until the stream ends).
pub(crate) fn guest_len(name: &str) -> Option<u64> {
    let o = opened(name)?;
    o.forward.as_ref()?.known_len()
}

/// `checksum` of a source opened here: a raw stream of unknown length is hashed as it
/// arrives (one pass, the digest's own zero-block detection); anything else through the
/// device walk, with at most 4 workers on a forward-only source so parallel reads stay
/// within its window.
pub(crate) fn checksum(
    name: &str,
    img: &Image,
    opts: &mut diskimg::checksum::Options,
    bar: &crate::stream_progress::StreamProgress,
) -> Result<diskimg::checksum::Digest> {
    let o = opened(name).ok_or_else(|| anyhow!("'{name}' was not opened as a stream"))?;
    let err = |e: diskimg::Error| anyhow!("error while reading '{name}': {e}");
    match &o.forward {
        Some(f) if img.format == Format::Raw && f.known_len().is_none() => {
            let mut h = diskimg::checksum::Hasher::new(opts.algorithm);
            let mut buf = vec![0u8; 4 << 20];
            let mut pos = 0u64;
            loop {
                use diskimg::Storage;
                f.read_exact_at(&mut buf, pos).map_err(err)?;
                let end = f
                    .known_len()
                    .map_or(pos + buf.len() as u64, |l| l.min(pos + buf.len() as u64));
                let n = usize::try_from(end - pos).unwrap_or(0);
                h.update(buf.get(..n).unwrap_or_default());
                pos = end;
                bar.update(input_done(&o), o.input.input_len);
                if f.known_len().is_some_and(|l| pos >= l) {
                    break;
                }
            }
            Ok(h.finalize())
        }
        forward => {
            if forward.is_some() {
                opts.workers = opts.workers.min(4);
            }
            diskimg::checksum::checksum(img.device.as_ref(), opts, &mut |d, t| {
                bar.update(d, Some(t))
            })
            .map_err(err)
        }
    }
}

/// Bytes of the underlying input read so far.
fn input_done(o: &Opened) -> u64 {
    o.input
        .input_read
        .load(std::sync::atomic::Ordering::Relaxed)
}
