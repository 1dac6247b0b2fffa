//! `convert` from sources that are not files (see `crate::source`): one pass over a
//! stream, a stream of unknown length, progress over the input, no partial target left
//! behind.
//!
//! A raw stream whose length is unknown until its end (a pipe, a gzip/xz/bzip2 file, a
//! server without a `Content-Length`) reports a provisional size: the target is created
//! at that size, the copy skips everything past the real end at once (it reads as a
//! hole), and the target is then cut to the real length (rounded up to a sector).
//! Raw and qcow2 targets can be cut; other formats are refused up front. Into an
//! existing target (`-n`, a block device) such a stream is copied in order until it
//! ends ([`copy_into_existing`]).

use std::io::Write;

use anyhow::{Context, Result, anyhow, bail};
use diskimg::{BlockDevice, CacheMode, Format, Image};

use crate::common::open_resolved;

/// Opens a `convert` source: one pass for streams (no read to the end first).
pub(super) fn open_source(name: &str, format: Option<Format>, cache: CacheMode) -> Result<Image> {
    // qemu's `json:{…}` names (a null-co device, nested formats, …).
    if crate::imgspec::is_spec(name) {
        return crate::common::open_image(name, format, true, true);
    }
    match crate::source::open_special(name, format, false)? {
        Some(img) => Ok(img),
        None => {
            let (path, format, opts) = crate::secrets::resolve(name, format)?;
            open_resolved(name, &path, format, opts.with_cache(cache), true, true)
        }
    }
}

/// True when `name` is a raw stream whose length is not known yet.
pub(super) fn unknown_length(img: &Image) -> bool {
    img.format == Format::Raw
        && crate::source::opened(&img.filename)
            .and_then(|o| o.forward.clone())
            .is_some_and(|f| f.known_len().is_none())
}

/// Refuses what a stream of unknown length cannot do.
pub(super) fn check_target(images: &[Image], out_fmt: Format, no_create: bool) -> Result<()> {
    let Some(img) = images.iter().find(|i| unknown_length(i)) else {
        return Ok(());
    };
    let name = &img.filename;
    if images.len() > 1 {
        bail!(
            "'{name}': the length of this stream is unknown until its end; it can only be converted alone"
        );
    }
    if !no_create && !matches!(out_fmt, Format::Raw | Format::Qcow2) {
        bail!(
            "'{name}': the length of this stream is unknown until its end; convert it to raw or qcow2 (which can be cut to the length found), or give a source of known length"
        );
    }
    Ok(())
}

/// Whether the (single) source is a stream whose progress is the input read.
pub(super) fn streamed(images: &[Image]) -> bool {
    let [img] = images else { return false };
    crate::source::opened(&img.filename).is_some_and(|o| o.forward.is_some())
}

/// Progress as bytes of the input read of its length, for a stream source whose input
/// length is known; otherwise the copy's own `(done, total)`.
pub(super) fn progress(images: &[Image], done: u64, total: u64) -> (u64, u64) {
    let [img] = images else { return (done, total) };
    match crate::source::opened(&img.filename) {
        Some(o) if o.forward.is_some() => match o.input.input_len {
            Some(len) => (
                o.input
                    .input_read
                    .load(std::sync::atomic::Ordering::Relaxed),
                len,
            ),
            None => (done, total),
        },
        _ => (done, total),
    }
}

/// Cuts the target to the length a stream of unknown length turned out to have.
pub(super) fn finish(images: &[Image], dst_name: &str, out_fmt: Format) -> Result<()> {
    let [img] = images else { return Ok(()) };
    let Some(f) = crate::source::opened(&img.filename).and_then(|o| o.forward.clone()) else {
        return Ok(());
    };
    if img.format != Format::Raw {
        return Ok(());
    }
    let len = f
        .known_len()
        .context("the stream did not end")?
        .next_multiple_of(512);
    let target = diskimg::open(
        dst_name,
        Some(out_fmt),
        &diskimg::ImageOptions::read_only(false),
    )
    .with_context(|| format!("Could not open '{dst_name}'"))?;
    if target.device.virtual_size() != len {
        target
            .device
            .resize(len, diskimg::blockio::Preallocation::Off, true)
            .with_context(|| format!("error while writing to {dst_name}"))?;
    }
    target.close()?;
    Ok(())
}

/// True when a source is a stream: a failed conversion from one removes the target it
/// created (a partial image must not look complete).
pub(super) fn any_stream(srcs: &[String]) -> bool {
    srcs.iter().any(|s| crate::source::opened(s).is_some())
}

static CREATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that this conversion created its target (only such a target is removed
/// after a failure).
pub(super) fn mark_created() {
    CREATED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`mark_created`] was called.
pub(super) fn was_created() -> bool {
    CREATED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `convert -n` from a raw stream of unknown length: its bytes are written in order into
/// the existing target until the stream ends (zero runs as `write_zeroes`); a stream
/// longer than the target fails naming it, and the target's bytes past the stream's end
/// are left as they are (as `qemu-img convert -n` leaves them past a smaller source).
pub(super) fn copy_into_existing(
    src: &dyn BlockDevice,
    images: &[Image],
    dst: &dyn BlockDevice,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let name = images.first().map(|i| i.filename.as_str()).unwrap_or("-");
    let end = || crate::source::guest_len(name).unwrap_or_else(|| src.virtual_size());
    let mut w = DeviceWriter {
        dev: dst,
        pos: 0,
        zeroes: 0,
        overflow: false,
    };
    let cap = dst.virtual_size();
    let r = diskimg::stream::write_raw(src, &mut w, &end, &mut |d| {
        let (d, t) = self::progress(images, d, cap);
        progress(d, t);
    })
    .map_err(|e| anyhow!("{e}"));
    let r = r.and_then(|_| w.flush().map_err(|e| anyhow!("{e}")));
    if w.overflow {
        bail!("'{name}' is longer than the target ({cap} bytes)");
    }
    r
}

/// Writes into a device at increasing offsets; runs of zeroes become one
/// `write_zeroes`. Refuses to write past the device's end.
struct DeviceWriter<'a> {
    dev: &'a dyn BlockDevice,
    /// Where the pending zero run starts.
    pos: u64,
    /// Length of the pending zero run.
    zeroes: u64,
    /// A write past the end was refused.
    overflow: bool,
}

impl DeviceWriter<'_> {
    fn io(e: diskimg::Error) -> std::io::Error {
        std::io::Error::other(e.to_string())
    }

    fn check(&mut self, len: u64) -> std::io::Result<()> {
        if self.pos + self.zeroes + len > self.dev.virtual_size() {
            self.overflow = true;
            return Err(std::io::Error::other("past the end of the target"));
        }
        Ok(())
    }
}

impl Write for DeviceWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.check(buf.len() as u64)?;
        if diskimg_convert::is_zero(buf) {
            self.zeroes += buf.len() as u64;
            return Ok(buf.len());
        }
        self.flush()?;
        self.dev.write_at(buf, self.pos).map_err(Self::io)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.zeroes > 0 {
            self.check(0)?;
            self.dev
                .write_zeroes(
                    self.pos,
                    self.zeroes,
                    diskimg::blockio::ZeroFlags::default(),
                )
                .map_err(Self::io)?;
            self.pos += self.zeroes;
            self.zeroes = 0;
        }
        Ok(())
    }
}
