//! `io [-f FMT] [-c CMD]... FILE`: a subset of qemu-io's command language.
//!
//! Commands: `read [-P BYTE] [-v] [-q] OFF LEN`, `write [-P BYTE] [-z] [-c] [-q] OFF LEN`,
//! `discard [-q] OFF LEN`, `flush`. Numbers take k/M/G/T suffixes or `0x` hex. Output
//! lines are qemu-io's; a failed command or pattern check makes the exit status 1.

use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use diskimg::BlockDevice;
use diskimg::blockio::ZeroFlags;

use crate::common::{open_image, opt_format, out, parse_num};

/// Arguments of `io`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// A command to run; may repeat (run in order).
    #[arg(short = 'c', long = "cmd")]
    cmds: Vec<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Accepted for compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: String,
}

/// qemu-io's `cvtstr`: `64 KiB`, `512 bytes`, `1.500 KiB`.
fn cvtstr(v: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (div, suffix) = UNITS
        .iter()
        .find(|(d, _)| v >= *d)
        .copied()
        .unwrap_or((1.0, " bytes"));
    let s = format!("{:.3}", v / div);
    match s.find(".000") {
        Some(i) => format!("{}{suffix}", s.get(..i).unwrap_or("")),
        None => format!("{s}{suffix}"),
    }
}

/// The statistics line qemu-io prints after a request.
fn stats(bytes: u64, start: Instant) -> String {
    let secs = start.elapsed().as_secs_f64().max(1e-6);
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    let cs = (secs.fract() * 100.0).floor();
    format!(
        "{}, 1 ops; {:02}.{:02} sec ({}/sec and {:.4} ops/sec)\n",
        cvtstr(b),
        secs.trunc(),
        cs,
        cvtstr(b / secs),
        1.0 / secs
    )
}

/// qemu-io's `read -v` hex dump.
fn dump(buf: &[u8], offset: u64) -> String {
    let mut s = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        s.push_str(&format!("{:08x}:  ", offset + (i as u64) * 16));
        for b in line {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        for &b in line {
            s.push(if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '.'
            });
        }
        s.push('\n');
    }
    s
}

struct Parsed {
    pattern: Option<u8>,
    verbose: bool,
    zero: bool,
    compressed: bool,
    quiet: bool,
    off: u64,
    len: u64,
}

/// A request length as a buffer size, refusing requests over 1 GiB.
fn buffer_len(len: u64) -> Result<usize> {
    let n = usize::try_from(len).map_err(|_| anyhow!("length too large"))?;
    if n > 1 << 30 {
        bail!("length {n} too large for one request");
    }
    Ok(n)
}

/// qemu-io's completion line (`read|wrote|discard N/N bytes at offset O`) and statistics,
/// unless `-q`.
fn report(s: &mut String, verb: &str, p: &Parsed, start: Instant) {
    if !p.quiet {
        s.push_str(&format!(
            "{verb} {0}/{0} bytes at offset {1}\n{2}",
            p.len,
            p.off,
            stats(p.len, start)
        ));
    }
}

fn parse_args(words: &[&str]) -> Result<Parsed> {
    let mut p = Parsed {
        pattern: None,
        verbose: false,
        zero: false,
        compressed: false,
        quiet: false,
        off: 0,
        len: 0,
    };
    let mut pos = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        match *w {
            "-P" => {
                let v = it.next().ok_or_else(|| anyhow!("-P needs a pattern"))?;
                let n = parse_num(v)?;
                p.pattern = Some(u8::try_from(n & 0xff).unwrap_or(0));
            }
            "-v" => p.verbose = true,
            "-z" => p.zero = true,
            "-c" => p.compressed = true,
            "-q" => p.quiet = true,
            w if w.starts_with('-') && w.len() > 1 => bail!("invalid option -- '{w}'"),
            w => pos.push(w),
        }
    }
    let [off, len] = pos.as_slice() else {
        bail!("expected OFFSET and LENGTH");
    };
    p.off = parse_num(off)?;
    p.len = parse_num(len)?;
    Ok(p)
}

/// Runs one command; `Ok(false)` means it failed (message already in `s`).
fn exec(dev: &dyn BlockDevice, cmd: &str, s: &mut String) -> Result<bool> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let Some((name, rest)) = words.split_first() else {
        return Ok(true);
    };
    match *name {
        "flush" | "f" => {
            if let Err(e) = dev.flush() {
                s.push_str(&format!("flush failed: {e}\n"));
                return Ok(false);
            }
            Ok(true)
        }
        "read" | "r" => {
            let p = parse_args(rest)?;
            let mut buf = vec![0u8; buffer_len(p.len)?];
            let start = Instant::now();
            if let Err(e) = dev.read_at(&mut buf, p.off) {
                s.push_str(&format!("read failed: {e}\n"));
                return Ok(false);
            }
            let mut ok = true;
            if let Some(pat) = p.pattern
                && buf.iter().any(|&b| b != pat)
            {
                s.push_str(&format!(
                    "Pattern verification failed at offset {}, {} bytes\n",
                    p.off, p.len
                ));
                ok = false;
            }
            if p.verbose {
                s.push_str(&dump(&buf, p.off));
            }
            report(s, "read", &p, start);
            Ok(ok)
        }
        "write" | "w" => {
            let p = parse_args(rest)?;
            let start = Instant::now();
            let res = if p.zero {
                dev.write_zeroes(p.off, p.len, ZeroFlags::default())
            } else {
                let buf = vec![p.pattern.unwrap_or(0xcd); buffer_len(p.len)?];
                if p.compressed {
                    dev.write_compressed(&buf, p.off)
                } else {
                    dev.write_at(&buf, p.off)
                }
            };
            if let Err(e) = res {
                s.push_str(&format!("write failed: {e}\n"));
                return Ok(false);
            }
            report(s, "wrote", &p, start);
            Ok(true)
        }
        "discard" | "d" => {
            let p = parse_args(rest)?;
            let start = Instant::now();
            if let Err(e) = dev.discard(p.off, p.len) {
                s.push_str(&format!("discard failed: {e}\n"));
                return Ok(false);
            }
            report(s, "discard", &p, start);
            Ok(true)
        }
        other => {
            s.push_str(&format!("command \"{other}\" not found\n"));
            Ok(false)
        }
    }
}

pub(crate) fn run(a: Args) -> Result<i32> {
    crate::common::set_force_share(a.force_share);
    let format = opt_format(a.format.as_deref(), &a.file)?;
    let writes = a.cmds.iter().any(|c| {
        let w = c.split_whitespace().next().unwrap_or("");
        matches!(w, "write" | "w" | "discard" | "d")
    });
    let img = open_image(&a.file, format, a.read_only || !writes, true)?;
    let mut failed = false;
    for cmd in &a.cmds {
        let mut s = String::new();
        match exec(img.device.as_ref(), cmd, &mut s) {
            Ok(ok) => failed |= !ok,
            Err(e) => {
                s.push_str(&format!("{cmd}: {e:#}\n"));
                failed = true;
            }
        }
        out(&s)?;
    }
    img.close()?;
    Ok(i32::from(failed))
}
