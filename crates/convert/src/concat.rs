//! Several devices end to end, as one read-only device (`convert SRC1 SRC2 … DST`).

use std::any::Any;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, DeviceInfo, Error, Extent, ExtentKind, Result, block_status, check_range,
};

/// A read-only device whose content is its parts one after the other. Each part is
/// read through its own backing chain; [`BlockDevice::map`] reports what the chain
/// says (data without host offsets, zero, or compressed).
#[derive(Debug)]
pub struct ConcatDevice {
    parts: Vec<(u64, Arc<dyn BlockDevice>)>,
    size: u64,
}

impl ConcatDevice {
    /// Joins `parts` in order.
    pub fn new(parts: Vec<Arc<dyn BlockDevice>>) -> Result<Self> {
        let mut size = 0u64;
        let mut out = Vec::new();
        for p in parts {
            out.push((size, p.clone()));
            size = size
                .checked_add(p.virtual_size())
                .ok_or(Error::invalid("total size of the sources overflows"))?;
        }
        Ok(Self { parts: out, size })
    }

    /// The part holding `offset`, its start, and how many of its bytes follow.
    fn part_at(&self, offset: u64) -> Option<(&dyn BlockDevice, u64, u64)> {
        self.parts.iter().find_map(|(start, d)| {
            let end = start.saturating_add(d.virtual_size());
            (offset >= *start && offset < end).then(|| (d.as_ref(), *start, end - offset))
        })
    }
}

impl BlockDevice for ConcatDevice {
    fn info(&self) -> DeviceInfo {
        let fmt = self.parts.first().map_or("raw", |(_, d)| d.info().format);
        let mut info = DeviceInfo::new(fmt, self.size);
        info.read_only = true;
        info
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let (dev, start, avail) = self
                .part_at(off)
                .ok_or(Error::invalid("concatenated read outside every part"))?;
            let n = usize::try_from(avail)
                .unwrap_or(usize::MAX)
                .min(buf.len() - pos);
            let piece = buf
                .get_mut(pos..pos + n)
                .ok_or(Error::invalid("concatenated read out of bounds"))?;
            dev.read_at(piece, off - start)?;
            pos += n;
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
        let (dev, start, avail) = self
            .part_at(offset)
            .ok_or(Error::invalid("concatenated map outside every part"))?;
        let st = block_status(dev, offset - start, len.min(avail))?;
        let kind = if st.compressed {
            ExtentKind::Compressed
        } else if st.zero {
            ExtentKind::Zero { offset: None }
        } else {
            ExtentKind::Data { offset: None }
        };
        Ok(Extent {
            offset,
            len: st.length,
            kind,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
