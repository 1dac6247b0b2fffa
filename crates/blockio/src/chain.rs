//! Block status across a backing chain, in the shape of qemu's `MapEntry`.

use crate::device::{BlockDevice, ExtentKind, check_range};
use crate::error::{Error, Result};

/// What a guest range is once the whole backing chain is consulted
/// (qemu-img map's `MapEntry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest byte offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which layer decided the content: 0 = the top image, 1 = its backing, …
    pub depth: u32,
    /// Some layer holds the range (false: nothing in the chain does, reads as zeroes).
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Stored as data (not known-zero).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the deciding layer's file, when it has a plain one.
    pub offset: Option<u64>,
    /// Which of the deciding layer's host files `offset` is in (see
    /// [`BlockDevice::map_file`]): 0 for the layer's own file.
    pub file: usize,
}

/// The first [`MapEntry`] at `offset`, at most `len` bytes, following backing devices.
pub fn block_status(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<MapEntry> {
    check_range(offset, len, dev.virtual_size())?;
    if len == 0 {
        return Err(Error::invalid("block_status of an empty range"));
    }
    let mut len = len;
    let mut depth = 0u32;
    let mut holder;
    let mut cur: &dyn BlockDevice = dev;
    loop {
        let e = cur.map(offset, len)?;
        if e.len == 0 || e.offset != offset {
            return Err(Error::internal(
                "device map returned an empty or misplaced extent",
            ));
        }
        len = len.min(e.len);
        let file = match e.kind.host_offset() {
            Some(_) => cur.map_file(offset),
            None => 0,
        };
        let entry = |present, zero, data, compressed, off| MapEntry {
            start: offset,
            length: len,
            depth,
            present,
            zero,
            data,
            compressed,
            offset: off,
            file,
        };
        let reserved = match e.kind {
            ExtentKind::Data { offset: o } => return Ok(entry(true, false, true, false, o)),
            ExtentKind::Zero { offset: o } => return Ok(entry(true, true, false, false, o)),
            ExtentKind::DataZero { offset: o } => {
                return Ok(entry(true, true, true, false, Some(o)));
            }
            ExtentKind::Compressed => return Ok(entry(true, false, true, true, None)),
            ExtentKind::Unallocated { offset: o } => o,
        };
        match cur.backing_device() {
            Some(b) if offset < b.virtual_size() => {
                len = len.min(b.virtual_size() - offset);
                depth = depth
                    .checked_add(1)
                    .ok_or(Error::invalid("backing chain too deep"))?;
                holder = b;
                cur = holder.as_ref();
            }
            // Beyond the end of the backing image: zeroes, reported at the depth of the
            // layer whose backing is too short (as qemu does), with the host space that
            // layer reserved there, if any.
            Some(_) | None => return Ok(entry(false, true, false, false, reserved)),
        }
    }
}

/// Every [`MapEntry`] over `offset..offset+len`, adjacent equal entries merged (with
/// contiguous host offsets in one host file), as `qemu-img map --output=json` prints them.
///
/// This collects [`map_chain_iter`]: the list is as long as the image is fragmented,
/// which a hostile image can make enormous (an L1 table whose entries all name one full
/// L2 table describes terabytes of separate clusters in a file of a few hundred KiB).
/// Code that maps untrusted images should consume the iterator instead.
pub fn map_chain(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
    map_chain_iter(dev, offset, len)?.collect()
}

/// The entries of [`map_chain`], produced one at a time in constant memory (one entry is
/// held back until the next one shows it cannot be merged).
pub fn map_chain_iter(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<MapChain<'_>> {
    check_range(offset, len, dev.virtual_size())?;
    Ok(MapChain {
        dev,
        pos: offset,
        end: offset + len,
        pending: None,
    })
}

/// Iterator returned by [`map_chain_iter`]: merged [`MapEntry`]s in guest order. After an
/// error it ends.
pub struct MapChain<'a> {
    dev: &'a dyn BlockDevice,
    pos: u64,
    end: u64,
    pending: Option<MapEntry>,
}

impl std::fmt::Debug for MapChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapChain")
            .field("pos", &self.pos)
            .field("end", &self.end)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

/// Whether `next` continues `last` (qemu-img's `entry_mergeable`).
fn mergeable(last: &MapEntry, next: &MapEntry) -> bool {
    last.depth == next.depth
        && last.present == next.present
        && last.zero == next.zero
        && last.data == next.data
        && last.compressed == next.compressed
        && last.file == next.file
        && match (last.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(last.length) == Some(b),
            (None, None) => true,
            _ => false,
        }
}

impl Iterator for MapChain<'_> {
    type Item = Result<MapEntry>;

    fn next(&mut self) -> Option<Result<MapEntry>> {
        while self.pos < self.end {
            let e = match block_status(self.dev, self.pos, self.end - self.pos) {
                Ok(e) => e,
                Err(err) => {
                    self.pos = self.end;
                    self.pending = None;
                    return Some(Err(err));
                }
            };
            self.pos += e.length;
            match &mut self.pending {
                Some(last) if mergeable(last, &e) => last.length += e.length,
                Some(last) => return Some(Ok(std::mem::replace(last, e))),
                None => self.pending = Some(e),
            }
        }
        self.pending.take().map(Ok)
    }
}
