//! Progress of a pass over a stream or an image on stderr (`-p` of `checksum` and of
//! conversions whose output is stdout): a percentage when the total is known,
//! bytes so far when it is not. qemu's stdout progress format stays with the verbs
//! that print it ([`crate::common::Progress`]); stdout here may be the data itself.

use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant};

/// A throttled stderr progress line (at most ten updates a second).
pub(crate) struct StreamProgress {
    enabled: bool,
    last: Cell<Option<Instant>>,
    printed: Cell<bool>,
}

impl StreamProgress {
    /// A reporter that prints only when `enabled`.
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            last: Cell::new(None),
            printed: Cell::new(false),
        }
    }

    /// Reports `done` bytes of `total` (unknown: `None`).
    pub(crate) fn update(&self, done: u64, total: Option<u64>) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let finished = total.is_some_and(|t| done >= t);
        if let Some(t) = self.last.get()
            && now.duration_since(t) < Duration::from_millis(100)
            && !finished
        {
            return;
        }
        self.last.set(Some(now));
        self.printed.set(true);
        let mib = done as f64 / f64::from(1u32 << 20);
        let line = match total {
            Some(t) if t > 0 => format!(
                "    ({:.2}/100%) {mib:.1} MiB\r",
                done as f64 * 100.0 / t as f64
            ),
            _ => format!("    {mib:.1} MiB\r"),
        };
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(line.as_bytes());
        let _ = e.flush();
    }

    /// Ends the line (once, if anything was printed).
    pub(crate) fn end(&self) {
        if self.printed.replace(false) {
            let _ = std::io::stderr().write_all(b"\n");
        }
    }
}

impl Drop for StreamProgress {
    fn drop(&mut self) {
        self.end();
    }
}
