//! Corruption events: a format that finds its image corrupt while serving a request
//! (qemu's `qcow2_signal_corruption`) reports it here once per open image, and the
//! program decides how to show it (the CLI prints qemu's "Marking image as corrupt"
//! line on stderr). Libraries never print; without a reporter the event is dropped
//! (the request still fails with [`crate::Error::Corrupt`]).

use std::sync::OnceLock;

/// A reporter: `(format, message)`.
pub type CorruptionReporter = fn(&str, &str);

static REPORTER: OnceLock<CorruptionReporter> = OnceLock::new();

/// Installs the process-wide reporter; `false` when one was installed already.
pub fn set_corruption_reporter(f: CorruptionReporter) -> bool {
    REPORTER.set(f).is_ok()
}

/// Reports that `format` marked an image corrupt because of `message` (qemu's words).
pub fn report_corruption(format: &str, message: &str) {
    if let Some(f) = REPORTER.get() {
        f(format, message);
    }
}
