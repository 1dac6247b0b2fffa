//! [`ForwardStreamDevice`]: a stream-optimized VMDK whose grain directory is in its
//! footer (`gdOffset = GD_AT_END`, VMware's layout) read front to back, from a pipe or a
//! body without range support, by walking its markers (VMware "Virtual Disk Format 5.0"
//! §"Stream-Optimized Compressed Sparse Extents").
//!
//! Grain markers carry their guest LBA, so the grain tables at the end are not needed:
//! the walker inflates grains as they arrive and keeps the last [`WINDOW`] bytes of them
//! for parallel readers. Grains must come in increasing guest order (every writer of
//! this layout does so): a grain below one already seen is refused, since the range
//! may have been reported as zeroes. Ranges between grains read as zeroes once the walk
//! has passed them. A grain read after it left the window, a stream ending before its
//! footer and end-of-stream marker, and a malformed marker fail with an error naming
//! the input and the offset.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use diskimg_blockio::{
    BlockDevice, DeviceInfo, Error, Extent, ExtentKind, InfoValue, Result, check_range,
};

use crate::header::{
    FLAG_COMPRESS, FLAG_MARKER, GD_AT_END, MARKER_EOS, MARKER_FOOTER, SECTOR, SparseHeader,
};

/// Bytes of inflated grains kept behind the walk (48 MiB).
pub(crate) const WINDOW: u64 = 48 << 20;
/// The largest grain a walk accepts (VMware writes 64 KiB).
const MAX_GRAIN: u64 = 2 << 20;

struct Walk {
    reader: Box<dyn Read + Send>,
    /// Bytes of the file consumed.
    pos: u64,
    /// Inflated grains still kept, by grain number.
    window: BTreeMap<u64, Arc<Vec<u8>>>,
    window_bytes: u64,
    /// Grains below this are decided (walked past).
    frontier: u64,
    /// Runs of grains seen so far `[start, end)`, merged.
    seen: Vec<(u64, u64)>,
    done: bool,
    /// The error the walk stopped at, replayed to every later reader.
    failed: Option<Error>,
}

/// A read-only device over a forward-only stream-optimized VMDK (see the module docs).
pub struct ForwardStreamDevice {
    name: String,
    size: u64,
    grain: u64,
    grains: u64,
    walk: Mutex<Walk>,
}

impl std::fmt::Debug for ForwardStreamDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardStreamDevice")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// True when the 512-byte `header` starts a stream-optimized VMDK whose grain directory
/// is found through the footer: the layout [`ForwardStreamDevice`] reads.
pub fn is_forward_stream(header: &[u8]) -> bool {
    SparseHeader::parse(header).is_ok_and(|h| {
        h.flags & (FLAG_COMPRESS | FLAG_MARKER) == FLAG_COMPRESS | FLAG_MARKER
            && h.gd_offset == GD_AT_END
    })
}

impl ForwardStreamDevice {
    /// Reads the header of the stream `reader` (named `name` in errors) and skips to
    /// its first grain.
    pub fn open(name: &str, reader: Box<dyn Read + Send>) -> Result<Self> {
        let mut walk = Walk {
            reader,
            pos: 0,
            window: BTreeMap::new(),
            window_bytes: 0,
            frontier: 0,
            seen: Vec::new(),
            done: false,
            failed: None,
        };
        let mut sector = [0u8; 512];
        walk.read_exact(name, &mut sector)?;
        let h = SparseHeader::parse(&sector)?;
        h.validate(false)?;
        if !is_forward_stream(&sector) {
            return Err(Error::invalid(format!(
                "'{name}': not a stream-optimized VMDK with its grain directory at the end"
            )));
        }
        let grain = h.granularity.saturating_mul(SECTOR);
        if grain == 0 || grain > MAX_GRAIN {
            return Err(Error::corrupt("vmdk", "grain size out of range", 20));
        }
        let size = h.capacity.checked_mul(SECTOR).ok_or(Error::corrupt(
            "vmdk",
            "capacity out of range",
            12,
        ))?;
        let first = h
            .grain_offset
            .checked_mul(SECTOR)
            .filter(|&f| f >= SECTOR)
            .ok_or(Error::corrupt(
                "vmdk",
                "first grain offset out of range",
                64,
            ))?;
        walk.skip(name, first - SECTOR)?;
        Ok(Self {
            name: name.to_string(),
            size,
            grain,
            grains: size.div_ceil(grain),
            walk: Mutex::new(walk),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Walk> {
        self.walk.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, at: u64, what: impl std::fmt::Display) -> Error {
        Error::corrupt(
            "vmdk",
            format!("'{}': {what} (at offset {at})", self.name),
            at,
        )
    }

    /// Walks one more record (grain, table, directory, footer or end).
    fn step(&self, w: &mut Walk) -> Result<()> {
        let at = w.pos;
        let mut m = [0u8; 12];
        w.read_exact(&self.name, &mut m)?;
        let val = u64::from_le_bytes(
            m.get(..8)
                .and_then(|b| b.try_into().ok())
                .unwrap_or_default(),
        );
        let size = u32::from_le_bytes(
            m.get(8..12)
                .and_then(|b| b.try_into().ok())
                .unwrap_or_default(),
        );
        if size == 0 {
            let mut rest = [0u8; 500];
            w.read_exact(&self.name, &mut rest)?;
            let kind = u32::from_le_bytes(
                rest.get(..4)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or_default(),
            );
            match kind {
                MARKER_EOS => {
                    return Err(self.err(at, "end-of-stream marker before the footer"));
                }
                MARKER_FOOTER => {
                    let mut footer = [0u8; 512];
                    if val != 1 {
                        return Err(self.err(at, "footer marker of a wrong size"));
                    }
                    w.read_exact(&self.name, &mut footer)?;
                    let f =
                        SparseHeader::parse(&footer).map_err(|_| self.err(at, "invalid footer"))?;
                    if f.capacity.checked_mul(SECTOR) != Some(self.size) {
                        return Err(self.err(at, "footer and header disagree on the capacity"));
                    }
                    // The end-of-stream marker must follow: only then is the stream whole.
                    let eos_at = w.pos;
                    w.read_exact(&self.name, &mut footer)?;
                    if footer.iter().take(16).any(|&b| b != 0) {
                        return Err(self.err(eos_at, "no end-of-stream marker after the footer"));
                    }
                    w.frontier = u64::MAX;
                    w.done = true;
                    // Whatever wraps the stream (gzip, xz, a tar member) checks its own
                    // end when read to it.
                    w.drain(&self.name)?;
                }
                1 | 2 => {
                    let len = val
                        .checked_mul(SECTOR)
                        .filter(|&l| l <= (64 << 20))
                        .ok_or_else(|| self.err(at, "table marker of an impossible size"))?;
                    w.skip(&self.name, len)?;
                }
                k => return Err(self.err(at, format!("unknown stream marker type {k}"))),
            }
            return Ok(());
        }
        self.grain_record(w, at, val, size)
    }

    /// Reads, checks and inflates the grain record at `at` (marker already read).
    fn grain_record(&self, w: &mut Walk, at: u64, lba: u64, size: u32) -> Result<()> {
        let gs = self.grain / SECTOR;
        if !lba.is_multiple_of(gs) || lba / gs >= self.grains {
            return Err(self.err(at, format!("grain marker with an invalid LBA {lba}")));
        }
        let g = lba / gs;
        if w.frontier == u64::MAX || g < w.frontier {
            return Err(self.err(
                at,
                format!("grain at LBA {lba} is out of guest order: this image cannot be read front to back; save it to a file or use a seekable source"),
            ));
        }
        if u64::from(size) > self.grain + self.grain / 8 + 1024 {
            return Err(self.err(at, format!("compressed grain of {size} bytes is too large")));
        }
        let mut z = vec![0u8; size as usize];
        let grain = usize::try_from(self.grain).map_err(|_| Error::internal("grain size"))?;
        w.read_exact(&self.name, &mut z)?;
        let pad = (12 + u64::from(size)).next_multiple_of(SECTOR) - 12 - u64::from(size);
        w.skip(&self.name, pad)?;
        let mut out = Vec::new();
        let mut dec = flate2::write::ZlibDecoder::new(LimitedVec(&mut out, grain));
        dec.write_all(&z)
            .and_then(|()| dec.finish().map(|_| ()))
            .map_err(|e| self.err(at, format!("corrupt compressed grain ({e})")))?;
        let last = g + 1 == self.grains;
        let want = if last {
            self.size - g * self.grain
        } else {
            self.grain
        };
        if (out.len() as u64) < want && !last {
            return Err(self.err(
                at,
                format!("grain inflates to {} bytes, not {want}", out.len()),
            ));
        }
        out.resize(usize::try_from(want).unwrap_or(grain), 0);
        w.frontier = g + 1;
        match w.seen.last_mut() {
            Some((_, e)) if *e == g => *e = g + 1,
            _ => w.seen.push((g, g + 1)),
        }
        w.window_bytes += out.len() as u64;
        w.window.insert(g, Arc::new(out));
        while w.window_bytes > WINDOW {
            match w.window.pop_first() {
                Some((_, d)) => w.window_bytes -= d.len() as u64,
                None => break,
            }
        }
        Ok(())
    }

    /// Walks until grain `g` is decided.
    fn reach(&self, w: &mut Walk, g: u64) -> Result<()> {
        if let Some(e) = &w.failed {
            return Err(e.replay());
        }
        // Once the last grain is walked, nothing but tables and the footer may follow:
        // walk on to the end, so that whoever reads the last grain has a whole stream.
        while (w.frontier <= g || w.frontier >= self.grains) && !w.done {
            if let Err(e) = self.step(w) {
                w.failed = Some(e.replay());
                return Err(e);
            }
        }
        if w.frontier <= g {
            return Err(self.err(w.pos, "stream ended before its footer"));
        }
        Ok(())
    }

    /// What grain `g` is once decided: its data, zeroes, or gone from the window.
    fn grain_at(&self, w: &mut Walk, g: u64) -> Result<Option<Arc<Vec<u8>>>> {
        self.reach(w, g)?;
        if let Some(d) = w.window.get(&g) {
            return Ok(Some(d.clone()));
        }
        if w.is_seen(g) {
            return Err(Error::invalid(format!(
                "'{}': grain {g} (guest offset {}) was already passed: this input can only be read front to back (the last {} MiB of grains are kept); save it to a file or use a seekable source",
                self.name,
                g * self.grain,
                WINDOW >> 20
            )));
        }
        Ok(None)
    }
}

/// A `Write` into a vector that refuses to grow past a limit (an inflated grain is
/// never larger than a grain).
struct LimitedVec<'a>(&'a mut Vec<u8>, usize);

impl Write for LimitedVec<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > self.1 {
            return Err(std::io::Error::other("grain inflates past its size"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A read error of the input as [`Error::Io`], the input named once (readers of named
/// inputs name them already).
fn input_error(name: &str, e: &std::io::Error) -> Error {
    let ctx = format!("'{name}'");
    let msg = e.to_string();
    let source = match (msg.strip_prefix(&format!("{ctx}: ")), e.raw_os_error()) {
        (Some(rest), _) => std::io::Error::new(e.kind(), rest.to_string()),
        (None, Some(n)) => std::io::Error::from_raw_os_error(n),
        (None, None) => std::io::Error::new(e.kind(), msg),
    };
    Error::io(ctx, source)
}

impl Walk {
    /// Whether grain `g` was in the stream.
    fn is_seen(&self, g: u64) -> bool {
        let i = self.seen.partition_point(|&(_, e)| e <= g);
        self.seen.get(i).is_some_and(|&(s, _)| s <= g)
    }

    fn read_exact(&mut self, name: &str, buf: &mut [u8]) -> Result<()> {
        let mut n = 0;
        while n < buf.len() {
            match self.reader.read(buf.get_mut(n..).unwrap_or_default()) {
                Ok(0) => {
                    let at = self.pos + n as u64;
                    return Err(Error::corrupt(
                        "vmdk",
                        format!("'{name}': stream-optimized VMDK truncated at offset {at}"),
                        at,
                    ));
                }
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(input_error(name, &e)),
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Reads the input to its end, discarding what follows the stream.
    fn drain(&mut self, name: &str) -> Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(k) => self.pos += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(input_error(name, &e)),
            }
        }
    }

    fn skip(&mut self, name: &str, mut len: u64) -> Result<()> {
        let mut buf = [0u8; 4096];
        while len > 0 {
            let n = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
            self.read_exact(name, buf.get_mut(..n).unwrap_or_default())?;
            len -= n as u64;
        }
        Ok(())
    }
}

impl BlockDevice for ForwardStreamDevice {
    fn info(&self) -> DeviceInfo {
        let mut i = DeviceInfo::new("vmdk", self.size);
        i.cluster_size = Some(self.grain);
        i.read_only = true;
        i.format_specific = Some((
            "vmdk",
            vec![(
                "create-type".into(),
                InfoValue::Str("streamOptimized".into()),
            )],
        ));
        i
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut w = self.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let g = at / self.grain;
            let grain = usize::try_from(self.grain).unwrap_or(usize::MAX);
            let in_grain = usize::try_from(at - g * self.grain).unwrap_or(0);
            let n = (buf.len() - done).min(grain - in_grain);
            let dst = buf.get_mut(done..done + n).unwrap_or_default();
            match self.grain_at(&mut w, g)? {
                Some(d) => dst.copy_from_slice(
                    d.get(in_grain..in_grain + n)
                        .ok_or(Error::internal("short grain"))?,
                ),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        let mut w = self.lock();
        let g = offset / self.grain;
        self.reach(&mut w, g)?;
        let data = w.is_seen(g);
        // Extend over the following grains of the same kind that are already decided.
        let mut next = g + 1;
        while next.saturating_mul(self.grain) < offset + len
            && next < w.frontier.min(self.grains)
            && w.is_seen(next) == data
        {
            next += 1;
        }
        let len = next
            .saturating_mul(self.grain)
            .min(offset + len)
            .min(self.size)
            - offset;
        let kind = if data {
            ExtentKind::Compressed
        } else {
            ExtentKind::Unallocated { offset: None }
        };
        Ok(Extent { offset, len, kind })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
