//! `aio_read`, `aio_write`, `aio_flush`: requests that run concurrently.
//!
//! Requests go through the library's async face ([`diskimg::blockio::AsyncDevice`] over
//! the open device): reads are planned onto io_uring where the storage has one (`-i
//! io_uring`), everything else runs on the face's worker threads against the shared
//! device, so overlapping and interleaved requests really race inside the library, as
//! qemu's coroutines do. Completions are
//! reported in submission order when the session drains: at `aio_flush`, before any
//! other command (but `aio_*`, `sleep` and the blkdebug breakpoint commands), and at exit (qemu-io prints a completion when its main loop next
//! runs; scripts that issue several requests sort their output or drain explicitly).
//! At most [`MAX_INFLIGHT`] requests run at once; submitting more first waits for the
//! oldest.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use diskimg::BlockDevice;
use diskimg::blockio::{IoBuf, IoFuture, ZeroFlags};

use super::cmd::{Cmd, bad_option, pattern_opt, usage};
use super::getopt::{self, Event};
use super::out::{dump, report};
use super::rw::{alloc, iovec_len, num_arg, offset_and_iovec};
use super::session::{EINVAL, Session};
use crate::errmap::strerror;

/// What an asynchronous request reports when it completes.
struct Report {
    offset: u64,
    quiet: bool,
    machine: bool,
}

fn aio_read_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &AIO_READ;
    let (events, ops) = getopt::parse(name, args, "CiP:qrv", &[]);
    let (mut machine, mut quiet, mut verbose, mut pattern) = (false, false, false, None);
    for ev in events {
        match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt('C', _) => machine = true,
            Event::Opt('P', a) => match pattern_opt(s, a) {
                Ok(p) => pattern = Some(p),
                Err(e) => return e,
            },
            Event::Opt('i', _) => {
                s.out.print("injecting invalid read request\n");
                return 0;
            }
            Event::Opt('q', _) => quiet = true,
            Event::Opt('v', _) => verbose = true,
            Event::Opt(_, _) => {}
        }
    }
    let (offset, count) = match offset_and_iovec(s, c, &ops) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(dev) = device(s) else {
        return -EINVAL;
    };
    let r = Report {
        offset,
        quiet,
        machine,
    };
    let Some(buf) = alloc(count, 0xab) else {
        s.out.print("readv failed: Cannot allocate memory\n");
        return 0;
    };
    let start = Instant::now();
    let fut = match s.aio.face(&dev) {
        Ok(face) => face.read_at(IoBuf::from_vec(buf), offset),
        Err(e) => {
            s.out.print(&format!("readv failed: {}\n", strerror(&e)));
            return 0;
        }
    };
    let done = s.aio.submit(Box::new(move || {
        let buf = match block_on(fut) {
            Ok(b) => b,
            Err(e) => return format!("readv failed: {}\n", strerror(&e)),
        };
        let t = start.elapsed();
        let mut text = String::new();
        if let Some(p) = pattern
            && buf.iter().any(|&b| b != p)
        {
            text.push_str(&format!(
                "Pattern verification failed at offset {}, {count} bytes\n",
                r.offset
            ));
        }
        if r.quiet {
            return text;
        }
        if verbose {
            text.push_str(&dump(&buf, r.offset));
        }
        text.push_str(&report("read", t, r.offset, count, count, 1, r.machine));
        text
    }));
    if let Some(t) = done {
        s.out.print(&t);
    }
    0
}

fn aio_write_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &AIO_WRITE;
    let (events, ops) = getopt::parse(name, args, "CfiP:qruz", &[]);
    let (mut machine, mut fua, mut quiet, mut unmap, mut zero) =
        (false, false, false, false, false);
    let (mut pattern, mut registered) = (0xcd, false);
    for ev in events {
        match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt('C', _) => machine = true,
            Event::Opt('f', _) => fua = true,
            Event::Opt('q', _) => quiet = true,
            Event::Opt('r', _) => registered = true,
            Event::Opt('u', _) => unmap = true,
            Event::Opt('P', a) => match pattern_opt(s, a) {
                Ok(p) => pattern = p,
                Err(e) => return e,
            },
            Event::Opt('i', _) => {
                s.out.print("injecting invalid write request\n");
                return 0;
            }
            Event::Opt('z', _) => zero = true,
            Event::Opt(_, _) => {}
        }
    }
    if ops.len() < 2 {
        usage(s, c);
        return -EINVAL;
    }
    let checks = [
        (
            zero && ops.len() != 2,
            "-z supports only a single length parameter",
        ),
        (unmap && !zero, "-u requires -z to be specified"),
        (
            zero && registered,
            "cannot combine zero write with registered I/O buffer",
        ),
    ];
    if let Some((_, m)) = checks.iter().find(|(bad, _)| *bad) {
        s.out.print(&format!("{m}\n"));
        return -EINVAL;
    }
    let Some((off_arg, lens)) = ops.split_first() else {
        return -EINVAL;
    };
    let offset = match num_arg(s, off_arg) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let count = if zero {
        match num_arg(s, lens.first().map_or("", String::as_str)) {
            Ok(v) => v,
            Err(e) => return e,
        }
    } else {
        match iovec_len(s, lens) {
            Some(v) => v,
            None => return -EINVAL,
        }
    };
    let Some(b) = s.blk.as_ref() else {
        return -EINVAL;
    };
    let (dev, flush) = (b.dev.clone(), b.writethrough || fua);
    let r = Report {
        offset,
        quiet,
        machine,
    };
    let buf = if zero { None } else { alloc(count, pattern) };
    if !zero && buf.is_none() {
        s.out.print("aio_write failed: Cannot allocate memory\n");
        return 0;
    }
    let start = Instant::now();
    let face = match s.aio.face(&dev) {
        Ok(f) => f,
        Err(e) => {
            s.out
                .print(&format!("aio_write failed: {}\n", strerror(&e)));
            return 0;
        }
    };
    let write = match buf {
        Some(buf) => Write::Data(face.write_at(IoBuf::from_vec(buf), offset)),
        None => Write::Zeroes(face.write_zeroes(offset, count, ZeroFlags { may_unmap: unmap })),
    };
    // Writethrough and FUA: the flush follows the write, as qemu's completes it.
    let flushed = flush.then(|| face.device().clone());
    let done = s.aio.submit(Box::new(move || {
        let res = match write {
            Write::Data(f) => block_on(f).map(drop),
            Write::Zeroes(f) => block_on(f),
        };
        let res = res.and_then(|()| flushed.map_or(Ok(()), |d| d.flush()));
        let t = start.elapsed();
        match res {
            Err(e) => format!("aio_write failed: {}\n", strerror(&e)),
            Ok(()) if r.quiet => String::new(),
            Ok(()) => report("wrote", t, r.offset, count, count, 1, r.machine),
        }
    }));
    if let Some(t) = done {
        s.out.print(&t);
    }
    0
}

/// An `aio_write` in flight: data or zeroes.
enum Write {
    Data(IoFuture<IoBuf>),
    Zeroes(IoFuture<()>),
}

/// Waits for `f` on this thread (the futures need no runtime: the thread that
/// completes a request wakes this one).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

fn device(s: &Session) -> Option<Arc<dyn BlockDevice>> {
    s.blk.as_ref().map(|b| b.dev.clone())
}

fn aio_flush_f(s: &mut Session, _name: &str, _args: &[String]) -> i32 {
    s.drain();
    0
}

/// `aio_read`, `aio_write`, `aio_flush`.
pub(super) static COMMANDS: &[&Cmd] = &[&AIO_READ, &AIO_WRITE, &AIO_FLUSH];

static AIO_READ: Cmd = Cmd {
    argmin: 2,
    argmax: -1,
    args: Some("[-Ciqrv] [-P pattern] off len [len..]"),
    help: Some(AIO_READ_HELP),
    ..Cmd::new(
        "aio_read",
        aio_read_f,
        "asynchronously reads a number of bytes",
    )
};

static AIO_WRITE: Cmd = Cmd {
    argmin: 2,
    argmax: -1,
    write: true,
    args: Some("[-Cfiqruz] [-P pattern] off len [len..]"),
    help: Some(AIO_WRITE_HELP),
    ..Cmd::new(
        "aio_write",
        aio_write_f,
        "asynchronously writes a number of bytes",
    )
};

static AIO_FLUSH: Cmd = Cmd::new(
    "aio_flush",
    aio_flush_f,
    "completes all outstanding aio requests",
);

const AIO_READ_HELP: &str = "
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -i, -- treat request as invalid, for exercising stats
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

";

const AIO_WRITE_HELP: &str = "
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

";
