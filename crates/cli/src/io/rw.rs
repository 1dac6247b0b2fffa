//! The synchronous request commands `read`, `readv`, `discard` and `flush` (the writes are
//! in [`super::write`]), with qemu-io's flags, checks, messages and reports, and the
//! argument helpers every request command shares.

use std::time::Instant;

use super::cmd::{Cmd, bad_option, pattern_opt, usage};
use super::getopt::{self, Event};
use super::num::cvtnum;
use super::out::{dump, report};
use super::session::{Blk, EINVAL, MAX_REQUEST, Session};
use crate::errmap::strerror;

/// `ERANGE`, for requests over `INT_MAX` bytes.
pub(super) const ERANGE: i32 = 34;

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
            Event::Opt('P', a) => match pattern_opt(s, a) {
                Ok(p) => o.pattern = Some(p),
                Err(e) => return e,
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
    finish_read(s, &o, &buf, (offset, count), (pat_off, pat_len), t)
}

/// The end of `read` and `readv` of `count` bytes at `offset` into `buf`: the `-P`
/// check of `pat_len` bytes from `pat_off`, then, unless `-q`, the dump (`-v`) and the
/// timing line. Returns the command's value.
fn finish_read(
    s: &mut Session,
    o: &ReadOpts,
    buf: &[u8],
    (offset, count): (u64, u64),
    (pat_off, pat_len): (u64, u64),
    t: std::time::Duration,
) -> i32 {
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
        s.out.print(&dump(buf, offset));
    }
    s.out
        .print(&report("read", t, offset, count, count, 1, o.machine));
    ret
}

/// qemu-io's alignment checks for `-b` and `-c`.
pub(super) fn sector_aligned(s: &mut Session, offset: u64, count: u64) -> Result<(), i32> {
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
            Event::Opt('P', a) => match pattern_opt(s, a) {
                Ok(p) => o.pattern = Some(p),
                Err(e) => return e,
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
    finish_read(s, &o, &buf, (offset, count), (0, count), t)
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

/// `read`, `readv`, `discard`, `flush`.
pub(super) static COMMANDS: &[&Cmd] = &[&READ, &READV, &DISCARD, &FLUSH];

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

const DISCARD_HELP: &str = "
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

";
