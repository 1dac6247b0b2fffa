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
}
