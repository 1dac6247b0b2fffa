//! Corruption events: a format that finds its image corrupt while serving a request
//! (qemu's `qcow2_signal_corruption`) reports it here once per open image, and the
//! program decides how to show it (the CLI prints qemu's "Marking image as corrupt"
//! line on stderr for a fatal event, its "Image is corrupt" line for a non-fatal one).
//! An event is fatal when the format could mark the image corrupt: the image is open
//! read-write (qemu's `bdrv_is_writable`); on a read-only open it is only reported.
//! Libraries never print; without a reporter the event is dropped (the request still
//! fails with [`crate::Error::Corrupt`]). Failures a format steps past
//! (the request goes on, e.g. clusters that could not be freed leak) are reported the
//! same way ([`report_failure`]).

use std::sync::OnceLock;

/// A reporter: `(format, message, fatal)`; `fatal`: the image was marked corrupt (it
/// is open read-write), else the event is only reported.
pub type CorruptionReporter = fn(&str, &str, bool);

static REPORTER: OnceLock<CorruptionReporter> = OnceLock::new();

/// Installs the process-wide reporter; `false` when one was installed already.
pub fn set_corruption_reporter(f: CorruptionReporter) -> bool {
    REPORTER.set(f).is_ok()
}

/// Reports that `format` found an image corrupt because of `message` (qemu's words):
/// `fatal` when it marked the image corrupt (a read-write open), else a non-fatal event
/// (a read-only open, which cannot be marked).
pub fn report_corruption(format: &str, message: &str, fatal: bool) {
    if let Some(f) = REPORTER.get() {
        f(format, message, fatal);
    }
}

/// A reporter of failures a format steps past: `(what failed, the error)`.
pub type FailureReporter = fn(&str, &crate::Error);

static FAILURES: OnceLock<FailureReporter> = OnceLock::new();

/// Installs the process-wide reporter of failures formats step past; `false` when one
/// was installed already.
pub fn set_failure_reporter(f: FailureReporter) -> bool {
    FAILURES.set(f).is_ok()
}

/// Reports that `what` failed with `error` and the format carried on without it, as
/// qemu's drivers print such failures and go on (qcow2's `qcow2_free_clusters failed`:
/// the clusters leak). Without a reporter the failure is dropped.
pub fn report_failure(what: &str, error: &crate::Error) {
    if let Some(f) = FAILURES.get() {
        f(what, error);
    }
}
