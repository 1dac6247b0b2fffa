//! The one place where library errors become the CLI's words.
//!
//! The library's [`diskimg::Error`] says whose fault a failure is (see the taxonomy in
//! `diskimg_blockio::Error`'s module docs) and carries the format and file offset. qemu-img and
//! qemu-io print only the reason, and qemu-io prints `strerror(-errno)` for failed
//! requests; invoked as `qemu-img`/`qemu-io` the CLI must say the same. Every verb
//! reports through [`message`] (a whole error chain) or [`strerror`] (qemu-io's
//! request failures), so the mapping lives here once.

use diskimg::Error as E;

/// True when the error (or its cause) is a closed stdout: exit quietly like `head`.
pub(crate) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// True when the error (or its cause) is one only a whole chain has: a backing loop,
/// or a file the open policy refused ([`crate::layers`] does not open such files).
pub(crate) fn is_chain_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<E>(),
            Some(E::BackingLoop { .. } | E::BackingDenied { .. })
        )
    })
}

/// The message as qemu words it: each cause once (sources already included in their
/// parent's text are skipped), Rust's " (os error N)" suffixes removed.
pub(crate) fn message(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for c in e.chain() {
        let t = match c.downcast_ref::<E>() {
            Some(e) => words(e),
            None => c.to_string(),
        };
        if s.ends_with(&t) {
            continue;
        }
        if !s.is_empty() {
            s.push_str(": ");
        }
        s.push_str(&t);
    }
    while let Some(i) = s.find(" (os error ") {
        let end = s
            .get(i..)
            .and_then(|t| t.find(')'))
            .map_or(s.len(), |j| i + j + 1);
        s.replace_range(i..end, "");
    }
    s
}

/// One library error in the CLI's words. As qemu-img/qemu-io, a corrupt, foreign or
/// unsupported image is reported by the bare reason; as `diskimg`, with the format
/// and the offending offset ([`diskimg::Error::located`]) — except a refusal that names
/// its driver already (qemu's `Format driver 'raw' does not support option amendment`),
/// which reads the same in both.
fn words(e: &E) -> String {
    match e {
        E::Unsupported { format, what } if what.contains(&format!("driver '{format}'")) => {
            return what.to_string();
        }
        E::Corrupt { what, .. } | E::NotThisFormat { what, .. } | E::Unsupported { what, .. }
            if crate::common::as_qemu() =>
        {
            return what.to_string();
        }
        _ => {}
    }
    e.located()
}

/// qemu's `strerror(-ret)` text for a library error: the errno qemu's block layer
/// returns for the same failure.
pub(crate) fn strerror(e: &E) -> String {
    match e {
        E::Io { source, .. } => os_error_text(source),
        E::Unsupported { .. } => "Operation not supported".into(),
        E::InvalidArgument(_) | E::Key(_) | E::NotThisFormat { .. } => "Invalid argument".into(),
        E::ReadOnly => "Permission denied".into(),
        E::LimitExceeded { .. } => "Cannot allocate memory".into(),
        _ => "Input/output error".into(),
    }
}

/// qcow2's refusal of a snapshot's L1 table when the snapshot is used (qemu's
/// `qcow2_validate_table`: "Snapshot L1 table too large" / "… offset invalid"), with the
/// `strerror` text of the errno qemu returns with it (`EFBIG` / `EINVAL`). qemu prints
/// the words on a line of their own and the operation's failure with the errno after.
pub(crate) fn snapshot_l1_refusal(e: &E) -> Option<(String, &'static str)> {
    match e {
        E::Corrupt { what, .. } if what.starts_with("Snapshot L1 table ") => {
            let errno = if what.ends_with(" too large") {
                "File too large"
            } else {
                "Invalid argument"
            };
            Some((what.to_string(), errno))
        }
        _ => None,
    }
}

/// An OS error's `strerror` text (without Rust's " (os error N)").
pub(crate) fn os_error_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let t = std::io::Error::from_raw_os_error(n).to_string();
            match t.find(" (os error ") {
                Some(i) => t.get(..i).unwrap_or(&t).to_string(),
                None => t,
            }
        }
        None => "Input/output error".into(),
    }
}

/// A failure a format stepped past, as qemu's drivers print it (`WHAT: strerror`).
pub(crate) fn report_failure(what: &str, e: &E) {
    eprintln!("{what}: {}", strerror(e));
}

/// Prints a format's corruption event as qemu does (`qcow2_signal_corruption`, to
/// stderr, without the program-name prefix): a fatal one marked the image corrupt, a
/// non-fatal one (a read-only open) only says so.
pub(crate) fn report_corruption(format: &str, message: &str, fatal: bool) {
    if fatal {
        FATAL_EVENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "{format}: Marking image as corrupt: {message}; further corruption events will be suppressed"
        );
    } else {
        eprintln!(
            "{format}: Image is corrupt: {message}; further non-fatal corruption events will be suppressed"
        );
    }
}

/// How many fatal corruption events were reported ([`report_corruption`]).
static FATAL_EVENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The number of fatal corruption events so far: an image opened read-write before
/// one is gone after it (qemu-io's `No medium found`, `crate::io`).
pub(crate) fn fatal_events() -> u64 {
    FATAL_EVENTS.load(std::sync::atomic::Ordering::Relaxed)
}
