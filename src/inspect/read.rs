//! Bounded reads of the image under inspection, and the report being built.

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{Limits, Storage};

use super::{Finding, Report, Severity};

/// The image's bytes as the inspectors see them: every read is checked against the file
/// length first (a structure that does not fit is a finding, never an I/O error), and
/// sizes that come from the image are capped by [`Limits`].
pub(crate) struct Image<'a> {
    storage: &'a dyn Storage,
    /// Length of the file in bytes.
    pub(crate) len: u64,
    /// Resource bounds (table sizes).
    pub(crate) limits: Limits,
}

impl<'a> Image<'a> {
    pub(crate) fn new(storage: &'a dyn Storage, len: u64, limits: Limits) -> Self {
        Self {
            storage,
            len,
            limits,
        }
    }

    /// True when `len` bytes at `off` lie inside the file.
    pub(crate) fn contains(&self, off: u64, len: u64) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Reads `len` bytes at `off`, or `None` when they are not all in the file, the read
    /// fails, or `len` exceeds the metadata limit.
    pub(crate) fn read(&self, off: u64, len: u64) -> Option<Vec<u8>> {
        if !self.contains(off, len) || len > self.limits.max_metadata_bytes {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        self.storage.read_exact_at(&mut buf, off).ok()?;
        Some(buf)
    }

    /// Reads up to `len` bytes at `off` (fewer at the end of the file; empty past it).
    pub(crate) fn read_upto(&self, off: u64, len: u64) -> Vec<u8> {
        let n = self.len.saturating_sub(off).min(len);
        self.read(off, n).unwrap_or_default()
    }

    /// The last `len` bytes of the file (fewer when it is shorter).
    pub(crate) fn tail(&self, len: u64) -> (u64, Vec<u8>) {
        let off = self.len.saturating_sub(len);
        (off, self.read_upto(off, len))
    }
}

impl Report {
    /// Records a finding.
    pub(crate) fn add(&mut self, severity: Severity, check: &'static str, message: String) {
        self.findings.push(Finding {
            severity,
            check,
            message,
        });
    }

    /// Records an unsafe finding.
    pub(crate) fn unsafe_(&mut self, check: &'static str, message: impl Into<String>) {
        self.add(Severity::Unsafe, check, message.into());
    }

    /// Records that something could not be decided.
    pub(crate) fn unknown(&mut self, check: &'static str, message: impl Into<String>) {
        self.add(Severity::CannotTell, check, message.into());
    }

    /// Records a fact that does not make the image unsafe.
    pub(crate) fn note(&mut self, check: &'static str, message: impl Into<String>) {
        self.add(Severity::Note, check, message.into());
    }
}

/// UTF-16 text (big- or little-endian), lossily decoded.
pub(crate) fn utf16(data: &[u8], big_endian: bool) -> String {
    let units: Vec<u16> = data
        .chunks_exact(2)
        .filter_map(|c| if big_endian { c.be_u16(0) } else { c.le_u16(0) })
        .collect();
    String::from_utf16_lossy(&units)
}

/// Metadata ranges of one image (host offsets), to find structures that overlap each
/// other or that data points into. Bounded: at most one entry per table found in the
/// file, so by the file's size.
#[derive(Default)]
pub(crate) struct Ranges {
    v: Vec<(u64, u64, &'static str)>,
    sorted: bool,
}

impl Ranges {
    /// Adds `[off, off + len)` named `what`.
    pub(crate) fn add(&mut self, off: u64, len: u64, what: &'static str) {
        if len > 0 {
            self.v.push((off, off.saturating_add(len), what));
            self.sorted = false;
        }
    }

    /// Sorts once all ranges are added (before [`Ranges::hit`]).
    pub(crate) fn seal(&mut self) {
        self.v.sort_unstable();
        self.sorted = true;
    }

    /// The name of a range `[off, off + len)` overlaps, if any (after [`Ranges::seal`]).
    pub(crate) fn hit(&self, off: u64, len: u64) -> Option<&'static str> {
        debug_assert!(self.sorted);
        let end = off.saturating_add(len);
        // Ranges starting before `end`; the ones just before `off` may reach into it.
        let i = self.v.partition_point(|r| r.0 < end);
        self.v
            .get(..i)?
            .iter()
            .rev()
            .take(64)
            .find(|r| r.1 > off)
            .map(|r| r.2)
    }

    /// The first pair of ranges that overlap each other, if any (after sealing).
    pub(crate) fn first_overlap(&self) -> Option<(&'static str, &'static str, u64)> {
        let mut reach: Option<(u64, &'static str)> = None;
        for &(start, end, what) in &self.v {
            if let Some((r, w)) = reach
                && start < r
            {
                return Some((w, what, start));
            }
            if reach.is_none_or(|(r, _)| end > r) {
                reach = Some((end, what));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let mut r = Ranges::default();
        r.add(0, 512, "header");
        r.add(4096, 4096, "L1 table");
        r.add(65536, 65536, "L2 table");
        r.seal();
        assert_eq!(r.hit(0, 1), Some("header"));
        assert_eq!(r.hit(512, 3584), None);
        assert_eq!(r.hit(8000, 100), Some("L1 table"));
        assert_eq!(r.hit(131071, 10), Some("L2 table"));
        assert_eq!(r.hit(131072, 10), None);
        assert_eq!(r.first_overlap(), None);
        r.add(100, 1000, "refcount table");
        r.seal();
        assert_eq!(r.first_overlap(), Some(("header", "refcount table", 100)));
    }
}
