//! What `close()` means, shared by every format: once a device is closed, writes (and
//! flushes, resizes, repairs) are refused with [`Error::Closed`]; reads still work; a
//! second `close()` does nothing.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// The closed state of one device. Formats hold one, call [`Closed::close`] at the top
/// of [`BlockDevice::close`](crate::BlockDevice::close) (doing their closing work only
/// when it returns true) and [`Closed::check`] before every write.
#[derive(Debug, Default)]
pub struct Closed(AtomicBool);

impl Closed {
    /// An open device's state.
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }

    /// Marks the device closed; true only for the first call.
    pub fn close(&self) -> bool {
        !self.0.swap(true, Ordering::AcqRel)
    }

    /// Whether [`Closed::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// The whole of a format's [`BlockDevice::close`](crate::BlockDevice::close) when
    /// closing means writing out what is pending: marks the device closed and, the first
    /// time only and unless it is `read_only`, runs `flush`.
    pub fn close_with(&self, read_only: bool, flush: impl FnOnce() -> Result<()>) -> Result<()> {
        if !self.close() || read_only {
            return Ok(());
        }
        flush()
    }

    /// `Err(Error::Closed)` once closed.
    pub fn check(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_once() {
        let c = Closed::new();
        assert!(c.check().is_ok());
        assert!(c.close());
        assert!(!c.close());
        assert!(matches!(c.check(), Err(Error::Closed)));
    }

    #[test]
    fn close_with_flushes_once_and_only_when_writable() {
        let flushes = std::cell::Cell::new(0);
        let flush = || {
            flushes.set(flushes.get() + 1);
            Ok(())
        };
        let c = Closed::new();
        assert!(c.close_with(false, flush).is_ok());
        assert!(c.close_with(false, flush).is_ok());
        assert_eq!(flushes.get(), 1);
        let ro = Closed::new();
        assert!(ro.close_with(true, flush).is_ok());
        assert!(ro.is_closed());
        assert_eq!(flushes.get(), 1);
    }
}
