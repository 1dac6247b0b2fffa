//! The synchronous request commands: `read`, `readv`, `write`, `writev`, `discard`,
//! `flush`, with qemu-io's flags, checks, messages and reports.

use std::time::Instant;

use diskimg::blockio::{ExtentKind, ZeroFlags};

use super::cmd::{Cmd, bad_option, usage};
use super::getopt::{self, Event};
use super::num::{cvtnum, parse_pattern};
use super::out::{dump, report};
use super::session::{Blk, EINVAL, MAX_REQUEST, Session};
use crate::errmap::strerror;

/// `ERANGE`, for requests over `INT_MAX` bytes.
const ERANGE: i32 = 34;

/// A zero-filled buffer of `n` bytes, or `None` when memory is short.
pub(super) fn alloc(n: u64, fill: u8) -> Option<Vec<u8>> {
    let n = usize::try_from(n).ok()?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, fill);
    Some(v)
}

/// Parses `offset` for a command, printing qemu-io's message on failure.
pub(super) fn num_arg(s: &mut Session, arg: &str) -> Result<u64, i32> {
    cvtnum(arg).map_err(|e| {
        s.out.print(&e.message(arg));
        -EINVAL
    })
}

/// Flushes after a write in writethrough mode (qemu's FUA emulation).
pub(super) fn write_done(blk: &Blk, fua: bool) -> diskimg::Result<()> {
    if blk.writethrough || fua {
        blk.dev.flush()?;
    }
    Ok(())
}

/// The open image (commands run only with one; see `cmds::run`).
pub(super) fn blk(s: &Session) -> Option<&Blk> {
    s.blk.as_ref()
}

/// The request lengths of `readv`/`writev`/`aio_*` (`create_iovec`), summed.
pub(super) fn iovec_len(s: &mut Session, lens: &[String]) -> Option<u64> {
    let mut total = 0u64;
    for a in lens {
        let len = num_arg(s, a).ok()?;
        if len > MAX_REQUEST {
            s.out.print(&format!(
                "Argument '{a}' exceeds maximum size {MAX_REQUEST}\n"
            ));
            return None;
        }
        if total > MAX_REQUEST - len {
            s.out.print(&format!(
                "The total number of bytes exceed the maximum size {MAX_REQUEST}\n"
            ));
            return None;
        }
        total += len;
    }
    Some(total)
}

/// `OFFSET LEN` of `read`/`write`-like commands: both numbers, the length at most
/// `MAX_REQUEST`; on a mistake the message is printed and the command's return value given.
pub(super) fn offset_and_length(
    s: &mut Session,
    c: &Cmd,
    ops: &[String],
) -> Result<(u64, u64), i32> {
    let [off, len] = ops else {
        usage(s, c);
        return Err(-EINVAL);
    };
    let (offset, count) = match (num_arg(s, off), num_arg(s, len)) {
        (Ok(o), Ok(l)) => (o, l),
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    if count > MAX_REQUEST {
        s.out.print(&format!(
            "length cannot exceed {MAX_REQUEST}, given {len}\n"
        ));
        return Err(-EINVAL);
    }
    Ok((offset, count))
}

/// `OFFSET LEN [LEN...]` of `readv`/`writev`/`aio_*`: the offset and the summed lengths
/// (`iovec_len`); on a mistake the message is printed and the command's return value given.
pub(super) fn offset_and_iovec(
    s: &mut Session,
    c: &Cmd,
    ops: &[String],
) -> Result<(u64, u64), i32> {
    let Some((off, lens)) = ops.split_first().filter(|(_, l)| !l.is_empty()) else {
        usage(s, c);
        return Err(-EINVAL);
    };
    let offset = num_arg(s, off)?;
    let count = iovec_len(s, lens).ok_or(-EINVAL)?;
    Ok((offset, count))
}

#[derive(Default)]
struct ReadOpts {
    machine: bool,
    quiet: bool,
    verbose: bool,
    pattern: Option<u8>,
    pat_off: Option<u64>,
    pat_len: Option<u64>,
    vmstate: bool,
}

fn read_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &READ;
    let (events, ops) = getopt::parse(name, args, "bCl:pP:qrs:v", &[]);
    let mut o = ReadOpts::default();
    for ev in events {
        match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt('b', _) => o.vmstate = true,
            Event::Opt('C', _) => o.machine = true,
            Event::Opt('l', a) => match num_arg(s, &a.unwrap_or_default()) {
                Ok(v) => o.pat_len = Some(v),
                Err(e) => return e,
            },
            Event::Opt('P', a) => match parse_pattern(&a.unwrap_or_default()) {
                Ok(p) => o.pattern = Some(p),
                Err(m) => {
                    s.out.print(&m);
                    return -EINVAL;
                }
            },
            Event::Opt('q', _) => o.quiet = true,
            Event::Opt('s', a) => match num_arg(s, &a.unwrap_or_default()) {
                Ok(v) => o.pat_off = Some(v),
                Err(e) => return e,
            },
            Event::Opt('v', _) => o.verbose = true,
            Event::Opt(_, _) => {}
        }
    }
    let (offset, count) = match offset_and_length(s, c, &ops) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if o.pattern.is_none() && (o.pat_len.is_some() || o.pat_off.is_some()) {
        usage(s, c);
        return -EINVAL;
    }
    let pat_off = o.pat_off.unwrap_or(0);
    let pat_len = o.pat_len.unwrap_or(count.wrapping_sub(pat_off));
    if pat_off > count || pat_len > count || pat_len + pat_off > count {
        s.out
            .print("pattern verification range exceeds end of read data\n");
        return -EINVAL;
    }
    if o.vmstate
        && let Err(e) = sector_aligned(s, offset, count)
    {
        return e;
    }
    let Some(mut buf) = alloc(count, 0xab) else {
        s.out.print("read failed: Cannot allocate memory\n");
        return -12;
    };
    let start = Instant::now();
    let res = match blk(s) {
        Some(b) if o.vmstate => super::misc::load_vmstate(b, &mut buf, offset),
        Some(b) => b.dev.read_at(&mut buf, offset),
        None => return -EINVAL,
    };
    let t = start.elapsed();
    if let Err(e) = res {
        s.out.print(&format!("read failed: {}\n", strerror(&e)));
        return -5;
    }
    let mut ret = 0;
    if let Some(p) = o.pattern {
        let from = usize::try_from(pat_off).unwrap_or(usize::MAX);
        let n = usize::try_from(pat_len).unwrap_or(usize::MAX);
        let win = buf.get(from..from.saturating_add(n)).unwrap_or(&[]);
        if win.iter().any(|&b| b != p) {
            s.out.print(&format!(
                "Pattern verification failed at offset {}, {pat_len} bytes\n",
                offset + pat_off
            ));
            ret = -EINVAL;
        }
    }
    if o.quiet {
        return ret;
    }
    if o.verbose {
        s.out.print(&dump(&buf, offset));
    }
    s.out
        .print(&report("read", t, offset, count, count, 1, o.machine));
    ret
}

/// qemu-io's alignment checks for `-b` and `-c`.
fn sector_aligned(s: &mut Session, offset: u64, count: u64) -> Result<(), i32> {
    if !offset.is_multiple_of(512) {
        s.out.print(&format!(
            "{offset} is not a sector-aligned value for 'offset'\n"
        ));
        return Err(-EINVAL);
    }
    if !count.is_multiple_of(512) {
        s.out.print(&format!(
            "{count} is not a sector-aligned value for 'count'\n"
        ));
        return Err(-EINVAL);
    }
    Ok(())
}

fn readv_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &READV;
    let (events, ops) = getopt::parse(name, args, "CP:qrv", &[]);
    let mut o = ReadOpts::default();
    for ev in events {
        match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt('C', _) => o.machine = true,
            Event::Opt('P', a) => match parse_pattern(&a.unwrap_or_default()) {
                Ok(p) => o.pattern = Some(p),
                Err(m) => {
                    s.out.print(&m);
                    return -EINVAL;
                }
            },
            Event::Opt('q', _) => o.quiet = true,
            Event::Opt('v', _) => o.verbose = true,
            Event::Opt(_, _) => {}
        }
    }
    let (offset, count) = match offset_and_iovec(s, c, &ops) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(mut buf) = alloc(count, 0xab) else {
        s.out.print("readv failed: Cannot allocate memory\n");
        return -12;
    };
    let start = Instant::now();
    let res = match blk(s) {
        Some(b) => b.dev.read_at(&mut buf, offset),
        None => return -EINVAL,
    };
    let t = start.elapsed();
    if let Err(e) = res {
        s.out.print(&format!("readv failed: {}\n", strerror(&e)));
        return -5;
    }
    let mut ret = 0;
    if let Some(p) = o.pattern
        && buf.iter().any(|&b| b != p)
    {
        s.out.print(&format!(
            "Pattern verification failed at offset {offset}, {count} bytes\n"
        ));
        ret = -EINVAL;
    }
    if o.quiet {
        return ret;
    }
    if o.verbose {
        s.out.print(&dump(&buf, offset));
    }
    s.out
        .print(&report("read", t, offset, count, count, 1, o.machine));
    ret
}

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
            Event::Opt('P', a) => match parse_pattern(&a.unwrap_or_default()) {
                Ok(p) => o.pattern = Some(p),
                Err(m) => {
                    s.out.print(&m);
                    return Err(-EINVAL);
                }
            },
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
        if matches!(e.kind, ExtentKind::Data { .. } | ExtentKind::Compressed) {
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
            Event::Opt('P', a) => match parse_pattern(&a.unwrap_or_default()) {
                Ok(p) => pattern = p,
                Err(m) => {
                    s.out.print(&m);
                    return -EINVAL;
                }
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

fn discard_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &DISCARD;
    let (events, ops) = getopt::parse(name, args, "Cq", &[]);
    let (mut machine, mut quiet) = (false, false);
    for ev in events {
        match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt('C', _) => machine = true,
            Event::Opt('q', _) => quiet = true,
            Event::Opt(_, _) => {}
        }
    }
    let (offset, bytes) = match offset_and_length(s, c, &ops) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(b) = blk(s) else {
        return -EINVAL;
    };
    let start = Instant::now();
    let res = b
        .dev
        .discard(offset, bytes)
        .and_then(|()| write_done(b, false));
    let t = start.elapsed();
    if let Err(e) = res {
        s.out.print(&format!("discard failed: {}\n", strerror(&e)));
        return -5;
    }
    if !quiet {
        s.out
            .print(&report("discard", t, offset, bytes, bytes, 1, machine));
    }
    0
}

fn flush_f(s: &mut Session, _name: &str, _args: &[String]) -> i32 {
    match blk(s).map(|b| b.dev.flush()) {
        Some(Ok(())) => 0,
        _ => -5,
    }
}

/// `read`, `readv`, `write`, `writev`, `discard`, `flush` (indices used above).
pub(super) static COMMANDS: &[&Cmd] = &[&READ, &READV, &WRITE, &WRITEV, &DISCARD, &FLUSH];

static READ: Cmd = Cmd {
    alt: Some("r"),
    argmin: 2,
    argmax: -1,
    args: Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
    help: Some(READ_HELP),
    ..Cmd::new(
        "read",
        read_f,
        "reads a number of bytes at a specified offset",
    )
};

static READV: Cmd = Cmd {
    argmin: 2,
    argmax: -1,
    args: Some("[-Cqrv] [-P pattern] off len [len..]"),
    help: Some(READV_HELP),
    ..Cmd::new(
        "readv",
        readv_f,
        "reads a number of bytes at a specified offset",
    )
};

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

static DISCARD: Cmd = Cmd {
    alt: Some("d"),
    argmin: 2,
    argmax: -1,
    write: true,
    args: Some("[-Cq] off len"),
    help: Some(DISCARD_HELP),
    ..Cmd::new(
        "discard",
        discard_f,
        "discards a number of bytes at a specified offset",
    )
};

static FLUSH: Cmd = Cmd {
    alt: Some("f"),
    ..Cmd::new("flush", flush_f, "flush all in-core file state to disk")
};

const READ_HELP: &str = "
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

";

const READV_HELP: &str = "
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

";

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

const DISCARD_HELP: &str = "
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

";
