//! qemu-io's output: stdout buffered the way glibc buffers it, stderr unbuffered, and the
//! report lines (`read 512/512 bytes at offset 0`, the statistics line, `-v` dumps).
//!
//! Scripts capture both streams into one pipe (`2>&1`), so *when* stdout text is written
//! decides where error messages land between report lines. qemu-io prints reports with
//! `printf` (a fully buffered stdout on a pipe or file: written in whole 4096-byte blocks,
//! and at `fflush`/exit; line-buffered on a terminal) and errors with `fprintf(stderr)`
//! (immediately). [`Out`] reproduces that, so the combined output is byte-identical.

use std::io::{IsTerminal, Write};
use std::time::Duration;

/// glibc's stdio buffer size for pipes and regular files (`st_blksize`).
const BLOCK: usize = 4096;

/// stdout and stderr with glibc's buffering.
#[derive(Debug)]
pub(crate) struct Out {
    pending: Vec<u8>,
    line_buffered: bool,
}

impl Out {
    /// stdout as qemu-io's C library sets it up.
    pub(crate) fn new() -> Self {
        Self {
            pending: Vec::new(),
            line_buffered: std::io::stdout().is_terminal(),
        }
    }

    /// `printf` to stdout.
    pub(crate) fn print(&mut self, s: &str) {
        self.pending.extend_from_slice(s.as_bytes());
        if self.line_buffered {
            if let Some(nl) = self.pending.iter().rposition(|&b| b == b'\n') {
                let rest = self.pending.split_off(nl + 1);
                write_stdout(&self.pending);
                self.pending = rest;
            }
            return;
        }
        // A full buffer is written only when more output arrives (glibc's xsputn).
        if self.pending.len() > BLOCK {
            let keep = match self.pending.len() % BLOCK {
                0 => BLOCK,
                r => r,
            };
            let rest = self.pending.split_off(self.pending.len() - keep);
            write_stdout(&self.pending);
            self.pending = rest;
        }
    }

    /// `fprintf(stderr, …)`: written at once, ahead of buffered stdout text.
    pub(crate) fn err(&mut self, s: &str) {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(s.as_bytes());
        let _ = e.flush();
    }

    /// `error_report`: `PROG: message` on stderr.
    pub(crate) fn error(&mut self, msg: &str) {
        self.err(&format!("{}: {msg}\n", crate::common::prog()));
    }

    /// `fflush(stdout)`.
    pub(crate) fn flush(&mut self) {
        if !self.pending.is_empty() {
            write_stdout(&self.pending);
            self.pending.clear();
        }
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        self.flush();
    }
}

fn write_stdout(b: &[u8]) {
    let mut o = std::io::stdout().lock();
    // As printf: a closed stdout does not stop qemu-io.
    let _ = o.write_all(b);
    let _ = o.flush();
}

/// qemu-io's `cvtstr`: `64 KiB`, `512 bytes`, `1.500 KiB`.
pub(crate) fn cvtstr(v: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let s = match UNITS.iter().find(|(d, _)| v >= *d) {
        Some((d, suffix)) => (format!("{:.3}", v / d), *suffix),
        None => (format!("{v:.6}"), " bytes"),
    };
    match s.0.find(".000") {
        Some(i) => format!("{}{}", s.0.get(..i).unwrap_or(""), s.1),
        None => format!("{}{}", s.0, s.1),
    }
}

/// qemu-io's `timestr`: `00.01 sec`, or `h:mm:ss.ss` from one second up (always with
/// `-C`).
fn timestr(t: Duration, verbose: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if verbose || secs > 0 {
        #[allow(clippy::cast_precision_loss)]
        let s = (secs % 60) as f64 + frac;
        format!("{}:{:02}:{s:05.2}", secs / 3600, (secs % 3600) / 60)
    } else {
        format!("{frac:05.2} sec")
    }
}

/// qemu-io's `print_report`: the completion line and the statistics line, or with `-C`
/// one comma-separated line.
pub(crate) fn report(
    op: &str,
    t: Duration,
    offset: u64,
    count: u64,
    total: u64,
    cnt: u32,
    machine: bool,
) -> String {
    let secs = t.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let tot = total as f64;
    let ts = timestr(t, machine);
    if machine {
        return format!(
            "{total},{cnt},{ts},{:.3},{:.3}\n",
            tot / secs,
            f64::from(cnt) / secs
        );
    }
    format!(
        "{op} {total}/{count} bytes at offset {offset}\n{}, {cnt} ops; {ts} ({}/sec and {:.4} ops/sec)\n",
        cvtstr(tot),
        cvtstr(tot / secs),
        f64::from(cnt) / secs
    )
}

/// qemu-io's `dump_buffer` (`read -v`): offsets, hex bytes, and the alphanumeric ones.
pub(crate) fn dump(buf: &[u8], offset: u64) -> String {
    let mut s = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        s.push_str(&format!("{:08x}:  ", offset.wrapping_add((i as u64) * 16)));
        for b in line {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        for &b in line {
            s.push(if b.is_ascii_alphanumeric() {
                char::from(b)
            } else {
                '.'
            });
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_like_qemu_io() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(0.5), "0.500000 bytes");
        assert_eq!(timestr(Duration::from_millis(10), false), "00.01 sec");
        assert_eq!(timestr(Duration::from_millis(61_500), false), "0:01:01.50");
        let r = report("read", Duration::from_millis(500), 0, 512, 512, 1, false);
        assert_eq!(
            r,
            "read 512/512 bytes at offset 0\n512 bytes, 1 ops; 00.50 sec (1 KiB/sec and 2.0000 ops/sec)\n"
        );
        assert_eq!(dump(b"ab\x00", 16), "00000010:  61 62 00  ab.\n");
    }
}
