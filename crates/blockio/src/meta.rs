//! Where an image keeps its own metadata: a sorted set of disjoint host byte ranges
//! ([`MetaRanges`]) that formats build at open (refusing layouts whose structures
//! overlap) and consult before every guest data write (refusing writes that would land
//! on metadata), as qemu's qcow2 overlap checks do.

use crate::error::{Error, Result};

/// One metadata structure: host bytes `start..end` of the image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaRange {
    /// First host byte.
    pub start: u64,
    /// One past the last host byte (`end > start`).
    pub end: u64,
    /// What lives there ("grain directory", "BAT", "parent locator", …).
    pub name: &'static str,
}

/// Two metadata structures that share host bytes (the layout of a corrupt or hostile
/// image): the one starting first, then the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap(pub MetaRange, pub MetaRange);

impl Overlap {
    /// A [`Error::Corrupt`] for `format` at the second structure's offset.
    pub fn to_error(self, format: &'static str) -> Error {
        Error::corrupt(format, "metadata structures overlap", self.1.start)
    }
}

/// The metadata ranges of one host file, sorted and disjoint.
///
/// Build it with [`MetaRanges::build`] (or [`MetaRanges::insert`] one at a time), then
/// guard data writes with [`MetaRanges::guard_write`]. Ranges of the same name that
/// touch are merged, so contiguous tables (a VMDK's grain tables, a run of VHDX sector
/// bitmap blocks) cost one entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaRanges {
    ranges: Vec<MetaRange>,
}

impl MetaRanges {
    /// No metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// The set of `ranges` given as `(start, len, name)`; empty ones are skipped, one whose
    /// end overflows reaches `u64::MAX`. Fails with the first pair that overlaps.
    pub fn build(
        ranges: impl IntoIterator<Item = (u64, u64, &'static str)>,
    ) -> Result<Self, Overlap> {
        let mut v: Vec<MetaRange> = ranges
            .into_iter()
            .filter(|&(_, len, _)| len > 0)
            .map(|(start, len, name)| MetaRange {
                start,
                end: start.saturating_add(len),
                name,
            })
            .collect();
        v.sort_unstable_by_key(|r| (r.start, r.end));
        let mut out: Vec<MetaRange> = Vec::new();
        for r in v {
            match out.last_mut() {
                Some(last) if r.start < last.end => return Err(Overlap(*last, r)),
                Some(last) if r.start == last.end && r.name == last.name => last.end = r.end,
                _ => out.push(r),
            }
        }
        Ok(Self { ranges: out })
    }

    /// Adds `len` bytes at `start` named `name` (nothing when `len` is 0). Fails, leaving
    /// the set unchanged, when they overlap a range already present.
    pub fn insert(&mut self, start: u64, len: u64, name: &'static str) -> Result<(), Overlap> {
        if len == 0 {
            return Ok(());
        }
        let r = MetaRange {
            start,
            end: start.saturating_add(len),
            name,
        };
        if let Some(hit) = self.overlapping(start, len) {
            return Err(if hit.start <= r.start {
                Overlap(*hit, r)
            } else {
                Overlap(r, *hit)
            });
        }
        let i = self.ranges.partition_point(|x| x.end <= start);
        let merge_prev = i
            .checked_sub(1)
            .and_then(|p| self.ranges.get(p))
            .is_some_and(|p| p.end == r.start && p.name == name);
        let merge_next = self
            .ranges
            .get(i)
            .is_some_and(|n| n.start == r.end && n.name == name);
        match (merge_prev, merge_next) {
            (true, true) => {
                let next_end = self.ranges.get(i).map_or(r.end, |n| n.end);
                self.ranges.remove(i);
                if let Some(p) = self.ranges.get_mut(i - 1) {
                    p.end = next_end;
                }
            }
            (true, false) => {
                if let Some(p) = self.ranges.get_mut(i - 1) {
                    p.end = r.end;
                }
            }
            (false, true) => {
                if let Some(n) = self.ranges.get_mut(i) {
                    n.start = r.start;
                }
            }
            (false, false) => self.ranges.insert(i, r),
        }
        Ok(())
    }

    /// The first range sharing a byte with `len` bytes at `start`, if any.
    pub fn overlapping(&self, start: u64, len: u64) -> Option<&MetaRange> {
        if len == 0 {
            return None;
        }
        let end = start.saturating_add(len);
        let i = self.ranges.partition_point(|r| r.end <= start);
        self.ranges.get(i).filter(|r| r.start < end)
    }

    /// True when `len` (> 0) bytes at `start` lie inside one range named `name` (ranges
    /// of one name that touch are merged, so a run of adjacent structures counts as one).
    pub fn covers(&self, start: u64, len: u64, name: &str) -> bool {
        let end = start.saturating_add(len);
        self.overlapping(start, len)
            .is_some_and(|r| r.name == name && r.start <= start && end <= r.end)
    }

    /// Refuses a guest data write of `len` bytes at host `start` that would land on
    /// metadata: [`Error::Corrupt`] for `format` at `start`.
    pub fn guard_write(&self, format: &'static str, start: u64, len: u64) -> Result<()> {
        match self.overlapping(start, len) {
            None => Ok(()),
            Some(_) => Err(Error::corrupt(
                format,
                "guest write would overwrite metadata",
                start,
            )),
        }
    }

    /// One past the last metadata byte (0 without metadata): where free space may start.
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r.end)
    }

    /// The ranges, in host order.
    pub fn ranges(&self) -> &[MetaRange] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_merges_touching_same_name_and_finds_overlaps() {
        let m = MetaRanges::build([
            (4096, 512, "table"),
            (0, 512, "header"),
            (4608, 512, "table"),
            (1024, 0, "empty"),
        ])
        .unwrap();
        assert_eq!(m.ranges().len(), 2);
        assert_eq!(m.end(), 5120);
        assert_eq!(m.overlapping(4000, 97).map(|r| r.name), Some("table"));
        assert_eq!(m.overlapping(4000, 96), None);
        assert_eq!(m.overlapping(512, 3584), None);
        assert!(m.guard_write("x", 5119, 1).is_err());
        assert!(m.guard_write("x", 5120, u64::MAX).is_ok());
        let e = MetaRanges::build([(0, 512, "header"), (511, 2, "table")]).unwrap_err();
        assert_eq!((e.0.name, e.1.name), ("header", "table"));
        assert!(matches!(
            e.to_error("x"),
            Error::Corrupt {
                offset: Some(511),
                ..
            }
        ));
        assert!(MetaRanges::build([(u64::MAX - 1, 8, "a"), (u64::MAX - 1, 1, "b")]).is_err());
    }

    #[test]
    fn insert_keeps_order_and_merges() {
        let mut m = MetaRanges::new();
        m.insert(1 << 20, 1 << 20, "bitmap").unwrap();
        m.insert(3 << 20, 1 << 20, "bitmap").unwrap();
        m.insert(0, 4096, "header").unwrap();
        m.insert(2 << 20, 1 << 20, "bitmap").unwrap();
        assert_eq!(m.ranges().len(), 2);
        assert_eq!(m.end(), 4 << 20);
        assert!(m.covers((2 << 20) - 1, 4096, "bitmap"));
        assert!(!m.covers((4 << 20) - 1, 2, "bitmap"));
        assert!(!m.covers(0, 4096, "bitmap"));
        assert!(!m.covers(5 << 20, 1, "bitmap"));
        let before = m.clone();
        let e = m.insert(100, 10, "log").unwrap_err();
        assert_eq!((e.0.name, e.1.name), ("header", "log"));
        assert!(m.insert((4 << 20) - 1, 10, "log").is_err());
        assert_eq!(m, before);
        m.insert(5 << 20, 0, "nothing").unwrap();
        assert_eq!(m, before);
    }
}
