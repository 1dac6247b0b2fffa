//! `convert --salvage`: copy what can be read of a damaged source. As qemu-img does, a
//! block-status query that fails is retried on a quarter of the range until it is one
//! sector, which is then reported (`error while reading block status at offset N`) and
//! read as data; a read that fails is retried sector by sector, and each sector that
//! still fails is reported (`error while reading offset N`) and copied as zeroes.
//!
//! qemu walks the source's block status twice (once to count the data for progress,
//! once while copying); so does salvage mode here ([`pre_pass`]), and each failing
//! sector is reported once per walk. The copy runs in order with one worker, so the
//! warnings come in offset order.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use diskimg::blockio::{Extent, ExtentKind};
use diskimg::{BlockDevice, Result};

use crate::io::filter::{Filter, Filtered};

const SECTOR: u64 = 512;

/// A source device read in salvage mode.
#[derive(Debug)]
pub(super) struct Salvage {
    inner: Arc<dyn BlockDevice>,
    quiet: bool,
    /// Sectors whose block-status failure was reported in this walk.
    reported: Mutex<BTreeSet<u64>>,
}

/// Wraps a convert source for `--salvage` (`quiet`: no warnings, as `-q`).
pub(super) fn wrap(inner: Arc<dyn BlockDevice>, quiet: bool) -> Arc<Filtered<Salvage>> {
    Arc::new(Filtered(Salvage {
        inner,
        quiet,
        reported: Mutex::new(BTreeSet::new()),
    }))
}

/// qemu-img's first walk over the sources' block status (it counts the data to copy);
/// failures are reported as in the copy itself, which then reports them again.
pub(super) fn pre_pass(sources: &[Arc<Filtered<Salvage>>]) -> Result<()> {
    for s in sources {
        let size = s.virtual_size();
        let mut pos = 0;
        while pos < size {
            let e = s.map(pos, size - pos)?;
            pos += e.len.max(1);
        }
        s.reported.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    Ok(())
}

impl Salvage {
    fn warn(&self, what: &str, offset: u64, e: diskimg::Error) {
        if !self.quiet {
            // qemu prints the errno's text (`strerror`).
            let msg = crate::io::strerror(&e);
            eprintln!("{}: warning: {what} {offset}: {msg}", crate::common::prog());
        }
    }
}

impl Filter for Salvage {
    fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let mut n = len;
        loop {
            match self.inner.map(offset, n) {
                Ok(e) => return Ok(e),
                Err(e) if n <= SECTOR => {
                    let first = self
                        .reported
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(offset);
                    if first {
                        self.warn("error while reading block status at offset", offset, e);
                    }
                    // Just try to read the data, then.
                    return Ok(Extent {
                        offset,
                        len: n,
                        kind: ExtentKind::Data { offset: None },
                    });
                }
                Err(_) => n = (n.div_ceil(SECTOR).div_ceil(4) * SECTOR).min(n),
            }
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.inner.read_at(buf, offset).is_ok() {
            return Ok(());
        }
        let step = usize::try_from(SECTOR).unwrap_or(512);
        for (i, sector) in buf.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            if let Err(e) = self.inner.read_at(sector, at) {
                self.warn("error while reading offset", at, e);
                sector.fill(0);
            }
        }
        Ok(())
    }
}
