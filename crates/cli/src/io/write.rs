//! The synchronous write commands `write` and `writev`, with qemu-io's flags (`-b -c -C -f
//! -n -P -q -r -s -u -z`), checks, messages and reports.

use std::time::Instant;

use diskimg::blockio::{ExtentKind, ZeroFlags};

use super::cmd::{Cmd, bad_option, pattern_opt, usage};
use super::getopt::{self, Event};
use super::out::report;
use super::rw::{ERANGE, alloc, blk, num_arg, offset_and_iovec, sector_aligned, write_done};
use super::session::{Blk, EINVAL, MAX_REQUEST, Session};
use crate::errmap::strerror;

/// The flags of `write`.
#[derive(Default)]
struct WriteOpts {
    vmstate: bool,
    compressed: bool,
    machine: bool,
    fua: bool,
    no_fallback: bool,
    pattern: Option<u8>,
    quiet: bool,
    source: Option<String>,
    unmap: bool,
    zero: bool,
    registered: bool,
}

fn write_opts(
    s: &mut Session,
    c: &Cmd,
    name: &str,
    args: &[String],
) -> Result<(WriteOpts, Vec<String>), i32> {
    let (events, ops) = getopt::parse(name, args, "bcCfnpP:qrs:uz", &[]);
    let mut o = WriteOpts::default();
    for ev in events {
        match ev {
            Event::Error(m) => return Err(bad_option(s, c, &m)),
            Event::Opt('b', _) => o.vmstate = true,
            Event::Opt('c', _) => o.compressed = true,
            Event::Opt('C', _) => o.machine = true,
            Event::Opt('f', _) => o.fua = true,
            Event::Opt('n', _) => o.no_fallback = true,
            Event::Opt('P', a) => o.pattern = Some(pattern_opt(s, a)?),
            Event::Opt('q', _) => o.quiet = true,
            Event::Opt('r', _) => o.registered = true,
            Event::Opt('s', a) => o.source = a,
            Event::Opt('u', _) => o.unmap = true,
            Event::Opt('z', _) => o.zero = true,
            Event::Opt(_, _) => {}
        }
    }
    if ops.len() != 2 {
        usage(s, c);
        return Err(-EINVAL);
    }
    let checks = [
        (
            o.vmstate && o.zero,
            "-b and -z cannot be specified at the same time",
        ),
        (
            o.fua && (o.vmstate || o.compressed),
            "-f and -b or -c cannot be specified at the same time",
        ),
        (o.no_fallback && !o.zero, "-n requires -z to be specified"),
        (o.unmap && !o.zero, "-u requires -z to be specified"),
        (
            u8::from(o.zero) + u8::from(o.pattern.is_some()) + u8::from(o.source.is_some()) > 1,
            "Only one of -z, -P, and -s can be specified at the same time",
        ),
    ];
    if let Some((_, m)) = checks.iter().find(|(bad, _)| *bad) {
        s.out.print(&format!("{m}\n"));
        return Err(-EINVAL);
    }
    Ok((o, ops))
}

/// The write buffer: the pattern, or a file's bytes repeated (`-s`).
fn write_buffer(s: &mut Session, o: &WriteOpts, count: u64) -> Option<Vec<u8>> {
    let Some(file) = &o.source else {
        return alloc(count, o.pattern.unwrap_or(0xcd));
    };
    let data = match std::fs::read(file) {
        Ok(d) => d,
        Err(e) => {
            s.out
                .err(&format!("{file}: {}\n", crate::errmap::os_error_text(&e)));
            return None;
        }
    };
    let mut buf = alloc(count, 0)?;
    let n = usize::try_from(count).ok()?;
    if data.is_empty() && n > 0 {
        s.out.err(&format!("{file}: file is empty\n"));
        return None;
    }
    for (i, b) in buf.iter_mut().enumerate() {
        *b = data.get(i % data.len().max(1)).copied().unwrap_or(0);
    }
    Some(buf)
}

fn write_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &WRITE;
    let (o, ops) = match write_opts(s, c, name, args) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let [off_arg, len_arg] = ops.as_slice() else {
        return -EINVAL;
    };
    let (offset, count) = match (num_arg(s, off_arg), num_arg(s, len_arg)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    if count > MAX_REQUEST && !o.no_fallback {
        s.out.print(&format!(
            "length cannot exceed {MAX_REQUEST} without -n, given {len_arg}\n"
        ));
        return -EINVAL;
    }
    if (o.vmstate || o.compressed)
        && let Err(e) = sector_aligned(s, offset, count)
    {
        return e;
    }
    if o.zero && o.registered {
        s.out
            .print("cannot combine zero write with registered I/O buffer\n");
        return -EINVAL;
    }
    let buf = if o.zero {
        Vec::new()
    } else {
        match write_buffer(s, &o, count) {
            Some(b) => b,
            None => return -EINVAL,
        }
    };
    if !o.zero && !o.vmstate && count > i32::MAX as u64 {
        s.out.print("write failed: Numerical result out of range\n");
        return -ERANGE;
    }
    let Some(b) = blk(s) else {
        return -EINVAL;
    };
    let start = Instant::now();
    let res = if o.vmstate {
        // qemu's `blk_save_vmstate` flushes too when the write cache is off.
        super::misc::save_vmstate(b, &buf, offset).and_then(|()| write_done(b, false))
    } else if o.zero {
        b.dev
            .write_zeroes(offset, count, ZeroFlags { may_unmap: o.unmap })
            .and_then(|()| write_done(b, o.fua))
    } else if o.compressed {
        write_compressed(b, &buf, offset)
    } else {
        b.dev
            .write_at(&buf, offset)
            .and_then(|()| write_done(b, o.fua))
    };
    let t = start.elapsed();
    if let Err(e) = res {
        s.out.print(&format!("write failed: {}\n", strerror(&e)));
        return -5;
    }
    if !o.quiet {
        s.out
            .print(&report("wrote", t, offset, count, count, 1, o.machine));
    }
    0
}

/// Compressed write of `buf` at `offset`, cluster by cluster (qemu splits a request over
/// several clusters the same way); the last unit may be short at the end of the disk.
fn write_compressed(b: &Blk, buf: &[u8], offset: u64) -> diskimg::Result<()> {
    let Some(unit) = b.dev.compressed_write_granularity() else {
        return Err(diskimg::Error::unsupported(
            b.dev.info().format,
            "compressed writes",
        ));
    };
    if !offset.is_multiple_of(unit) {
        return Err(diskimg::Error::invalid("unaligned compressed write"));
    }
    let step = usize::try_from(unit).unwrap_or(usize::MAX);
    let mut pos = offset;
    for chunk in buf.chunks(step) {
        // Compression never overwrites: qemu fails a cluster that holds data with EIO.
        let e = b.dev.map(pos, chunk.len() as u64)?;
        if matches!(
            e.kind,
            ExtentKind::Data { .. } | ExtentKind::DataZero { .. } | ExtentKind::Compressed
        ) {
            return Err(diskimg::Error::io(
                "compressed write over allocated data",
                std::io::Error::from_raw_os_error(5),
            ));
        }
        b.dev.write_compressed(chunk, pos)?;
        pos += chunk.len() as u64;
    }
    write_done(b, false)
}

fn writev_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &WRITEV;
    let (events, ops) = getopt::parse(name, args, "CfP:qr", &[]);
    let (mut machine, mut fua, mut quiet, mut pattern) = (false, false, false, 0xcd);
    for ev in events {
        match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt('C', _) => machine = true,
            Event::Opt('f', _) => fua = true,
            Event::Opt('q', _) => quiet = true,
            Event::Opt('P', a) => match pattern_opt(s, a) {
                Ok(p) => pattern = p,
                Err(e) => return e,
            },
            Event::Opt(_, _) => {}
        }
    }
    let (offset, count) = match offset_and_iovec(s, c, &ops) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(buf) = alloc(count, pattern) else {
        s.out.print("writev failed: Cannot allocate memory\n");
        return -12;
    };
    let Some(b) = blk(s) else {
        return -EINVAL;
    };
    let start = Instant::now();
    let res = b
        .dev
        .write_at(&buf, offset)
        .and_then(|()| write_done(b, fua));
    let t = start.elapsed();
    if let Err(e) = res {
        s.out.print(&format!("writev failed: {}\n", strerror(&e)));
        return -5;
    }
    if !quiet {
        s.out
            .print(&report("wrote", t, offset, count, count, 1, machine));
    }
    0
}

/// `write`, `writev`.
pub(super) static COMMANDS: &[&Cmd] = &[&WRITE, &WRITEV];

static WRITE: Cmd = Cmd {
    alt: Some("w"),
    argmin: 2,
    argmax: -1,
    write: true,
    args: Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
    help: Some(WRITE_HELP),
    ..Cmd::new(
        "write",
        write_f,
        "writes a number of bytes at a specified offset",
    )
};

static WRITEV: Cmd = Cmd {
    argmin: 2,
    argmax: -1,
    write: true,
    args: Some("[-Cfqr] [-P pattern] off len [len..]"),
    help: Some(WRITEV_HELP),
    ..Cmd::new(
        "writev",
        writev_f,
        "writes a number of bytes at a specified offset",
    )
};

const WRITE_HELP: &str = "
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

";

const WRITEV_HELP: &str = "
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer

";
