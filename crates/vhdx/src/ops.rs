//! The [`BlockDevice`] implementation of [`VhdxDevice`].

use std::any::Any;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, ChainLink, CheckReport, DeviceInfo, Error, Extent, Preallocation, RepairMode,
    Result, ZeroFlags, check_range,
};

use crate::device::{LogReplay, VhdxDevice};
use crate::format::FMT;

impl BlockDevice for VhdxDevice {
    fn info(&self) -> DeviceInfo {
        let mut info = DeviceInfo::new(FMT, self.size());
        info.cluster_size = Some(self.geo.block_size);
        info.read_only = self.read_only;
        info.backing = self.backing_ref();
        info.dirty = self.replay == LogReplay::InMemory;
        // qemu reports no format-specific block for vhdx; neither do we.
        info
    }

    fn virtual_size(&self) -> u64 {
        self.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        let st = self.read_state();
        self.read_locked(&st, buf, offset)
    }

    fn walk_runs(&self, offset: u64, len: u64, f: &mut diskimg_blockio::RunFn<'_>) -> Result<bool> {
        self.walk_locked(&self.read_state(), offset, len, f)
    }

    /// A constant, plus the parent's count: host bytes a walk reported stay that guest
    /// range's home while the image is open. Payload and sector bitmap blocks are only
    /// allocated at the end of the file (`VhdxDevice::allocate`), never freed: zero
    /// writes zero fully present blocks in place, a block set to the zero state leaks
    /// its payload, discard does nothing and growing keeps every block where it is.
    fn host_epoch(&self) -> Option<u64> {
        self.backing_epoch.host_epoch(0, || self.backing_dev())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.closed.check()?;
        check_range(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        {
            // Fast path: no allocation needed, many writers at once.
            let st = self.read_state();
            if self.all_present(&st, offset, buf.len() as u64) {
                return self.write_present(&st, buf, offset);
            }
        }
        let mut st = self.write_state();
        self.write_locked(&mut st, buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.closed.check()?;
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let mut st = self.write_state();
        self.zero_locked(&mut st, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // As qemu's vhdx driver: discard is accepted and ignored (the data stays), so
        // images we and qemu write stay identical.
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.closed.check()?;
        check_range(offset, len, self.size())
    }

    fn close(&self) -> Result<()> {
        // One shared meaning (blockio::Closed): later writes are refused, a second
        // close does nothing.
        self.closed.close_with(self.read_only, || self.flush())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.write_state();
        self.flush_locked(&mut st)
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size())?;
        if len == 0 {
            return Err(Error::invalid("map of an empty range"));
        }
        let st = self.read_state();
        self.map_locked(&st, offset, len)
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation, shrink: bool) -> Result<()> {
        let mut st = self.write_state();
        self.resize_locked(&mut st, new_size, prealloc, shrink)
    }

    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) -> Result<()> {
        if backing.is_some() && !self.meta.has_parent {
            return Err(Error::unsupported(
                FMT,
                "backing files (not a differencing image)",
            ));
        }
        if let Some(b) = backing.as_ref() {
            self.verify_linkage(b.as_any().downcast_ref::<VhdxDevice>())?;
        }
        let present = backing.is_some();
        let old = std::mem::replace(
            &mut *self.backing.write().unwrap_or_else(|e| e.into_inner()),
            backing,
        );
        self.backing_epoch.replaced(old.as_deref(), present);
        Ok(())
    }

    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing_dev()
    }

    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        if repair != RepairMode::None {
            // A repair is a write: refused after close, as every write.
            self.closed.check()?;
        }
        let st = self.read_state();
        let mut report = crate::check::check(self, &st)?;
        match self.replay {
            LogReplay::OnDisk => report.corruptions_fixed += 1,
            LogReplay::InMemory => {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR the log needs to be replayed{}",
                    if repair == RepairMode::All {
                        " (the image is opened read-only)"
                    } else {
                        "; run check -r all"
                    }
                ));
            }
            LogReplay::None => {}
        }
        Ok(report)
    }

    /// Differencing images only (their `parent_linkage`).
    fn as_chain_link(&self) -> Option<&dyn ChainLink> {
        (self.subformat() == "differencing").then_some(self as &dyn ChainLink)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for VhdxDevice {
    fn drop(&mut self) {
        // Like qemu's close: leave the log empty when the device is dropped.
        if !self.read_only {
            let mut st = self.write_state();
            let _ = self.flush_locked(&mut st);
        }
    }
}
