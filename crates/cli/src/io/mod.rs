//! `diskimg io` (and `qemu-io` when invoked by that name): qemu-io for scripts.
//!
//! The command line, the command language and the output are qemu-io 10's
//! (`qemu-io-cmds.c`): commands from `-c` or, without any `-c`, from stdin with a
//! `PROG> ` prompt; `open`/`close`/`reopen`; `read`/`readv`/`write`/`writev`/`discard`/
//! `flush`; `aio_read`/`aio_write`/`aio_flush` (requests run concurrently through the
//! library's async face, `AsyncDevice`); blkdebug's `break`/`wait_break`/`resume`/
//! `remove_break`; `map`, `alloc`, `info`, `length`, `truncate`, `sleep`,
//! `sigraise`, `abort`, `help`, `quit`. Flags are parsed as glibc's getopt does
//! (`-pP 0xa`, `-P0xa`, options after operands). Reports go to a glibc-buffered stdout
//! and errors straight to stderr, so `2>&1` captures interleave as qemu-io's do.
//!
//! A command failing (including a pattern mismatch) makes the exit status 1.

mod aio;
pub(crate) mod blkdebug;
mod breaks;
mod cmd;
mod cmds;
pub(crate) mod filter;
mod getopt;
mod layers;
mod medium;
mod misc;
mod num;
mod open;
mod out;
mod rw;
mod session;
mod write;

use std::io::BufRead;

use getopt::{Event, LongOpt};
pub(crate) use out::Out;
use session::Session;
use session::{Aio, OpenFlags};

const OBJECT: char = '\u{100}';
const IMAGE_OPTS: char = '\u{101}';

const LONGS: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: false,
        code: 'h',
    },
    LongOpt {
        name: "version",
        has_arg: false,
        code: 'V',
    },
    LongOpt {
        name: "cmd",
        has_arg: true,
        code: 'c',
    },
    LongOpt {
        name: "format",
        has_arg: true,
        code: 'f',
    },
    LongOpt {
        name: "read-only",
        has_arg: false,
        code: 'r',
    },
    LongOpt {
        name: "snapshot",
        has_arg: false,
        code: 's',
    },
    LongOpt {
        name: "nocache",
        has_arg: false,
        code: 'n',
    },
    LongOpt {
        name: "copy-on-read",
        has_arg: false,
        code: 'C',
    },
    LongOpt {
        name: "misalign",
        has_arg: false,
        code: 'm',
    },
    LongOpt {
        name: "native-aio",
        has_arg: false,
        code: 'k',
    },
    LongOpt {
        name: "aio",
        has_arg: true,
        code: 'i',
    },
    LongOpt {
        name: "discard",
        has_arg: true,
        code: 'd',
    },
    LongOpt {
        name: "cache",
        has_arg: true,
        code: 't',
    },
    LongOpt {
        name: "trace",
        has_arg: true,
        code: 'T',
    },
    LongOpt {
        name: "object",
        has_arg: true,
        code: OBJECT,
    },
    LongOpt {
        name: "image-opts",
        has_arg: false,
        code: IMAGE_OPTS,
    },
    LongOpt {
        name: "force-share",
        has_arg: false,
        code: 'U',
    },
];

fn usage(out: &mut Out, name: &str) {
    out.print(&USAGE.replace("{name}", name));
}

const USAGE: &str = "Usage: {name} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{name} -c help' for information on available commands.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
";

/// The global options after parsing.
struct Globals {
    cmds: Vec<String>,
    format: Option<String>,
    flags: OpenFlags,
    objects: Vec<String>,
    image_opts: bool,
    file: Option<String>,
}

/// Parses qemu-io's command line; `Err(code)` exits (help, version, usage errors).
fn parse_globals(argv0: &str, args: &[String], out: &mut Out) -> Result<Globals, i32> {
    let name = crate::common::prog();
    let (events, operands) = getopt::parse(argv0, args, "hVc:d:f:rsnCmki:t:T:U", LONGS);
    let mut g = Globals {
        cmds: Vec::new(),
        format: None,
        flags: OpenFlags::default(),
        objects: Vec::new(),
        image_opts: false,
        file: None,
    };
    for ev in events {
        let (c, arg) = match ev {
            Event::Opt(c, a) => (c, a.unwrap_or_default()),
            Event::Error(msg) => {
                out.err(&format!("{msg}\n"));
                usage(out, name);
                return Err(1);
            }
        };
        match c {
            's' => g.flags.snapshot = true,
            'n' => {
                g.flags.nocache = true;
                g.flags.writethrough = false;
            }
            'C' => g.flags.copy_on_read = true,
            'd' => {
                if open::parse_discard(&arg).is_none() {
                    out.error(&format!("Invalid discard option: {arg}"));
                    return Err(1);
                }
            }
            'f' => g.format = Some(arg),
            'c' => g.cmds.push(arg),
            'r' => g.flags.read_only = true,
            'm' | 'k' | 'T' => {}
            'i' => {
                if !open::valid_aio(&arg) {
                    out.error(&format!("Invalid aio option: {arg}"));
                    return Err(1);
                }
            }
            't' => {
                if !open::parse_cache(&arg, &mut g.flags) {
                    out.error(&format!("Invalid cache option: {arg}"));
                    return Err(1);
                }
            }
            'V' => {
                out.print(&format!(
                    "{name} version 10.0.2 (diskimg {})\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n",
                    env!("CARGO_PKG_VERSION")
                ));
                return Err(0);
            }
            'h' => {
                usage(out, name);
                return Err(0);
            }
            'U' => g.flags.force_share = true,
            OBJECT => g.objects.push(arg),
            IMAGE_OPTS => g.image_opts = true,
            _ => {
                usage(out, name);
                return Err(1);
            }
        }
    }
    if operands.len() > 1 {
        usage(out, name);
        return Err(1);
    }
    if g.format.is_some() && g.image_opts {
        out.error("--image-opts and -f are mutually exclusive");
        return Err(1);
    }
    g.file = operands.into_iter().next();
    Ok(g)
}

/// Runs qemu-io with `args` (the words after the program name, or after `diskimg io`);
/// returns the exit status.
pub(crate) fn main(argv0: &str, args: &[String]) -> i32 {
    let mut out = Out::new();
    let g = match parse_globals(argv0, args, &mut out) {
        Ok(g) => g,
        Err(code) => return code,
    };
    let globals = crate::secrets::GlobalArgs {
        objects: g.objects.clone(),
        image_opts: g.image_opts,
    };
    if let Err(e) = crate::secrets::init(&globals) {
        out.error(&crate::message(&e));
        return 1;
    }
    let mut s = Session {
        out,
        blk: None,
        image_opts: g.image_opts,
        quit: false,
        aio: Aio::default(),
    };
    if let Some(file) = &g.file {
        let mut dict = diskimg::OptionList::new();
        let name = if g.image_opts {
            match open::parse_image_opts(file, true) {
                Ok(d) => dict = d,
                Err(e) => {
                    s.out.error(&e);
                    return 1;
                }
            }
            None
        } else {
            if let Some(f) = &g.format {
                dict.set("driver", f);
            }
            Some(file.as_str())
        };
        if open::openfile(&mut s, name, g.flags.clone(), dict) != 0 {
            return 1;
        }
    }
    let last_error = command_loop(&mut s, &g.cmds);
    open::close(&mut s);
    s.out.flush();
    i32::from(last_error < 0)
}

/// Runs the `-c` commands, or reads commands from stdin when there are none.
fn command_loop(s: &mut Session, cmds: &[String]) -> i32 {
    let mut last_error = 0;
    if !cmds.is_empty() {
        for c in cmds {
            if s.quit {
                break;
            }
            let r = cmds::run(s, c);
            if r < 0 {
                last_error = r;
            }
        }
        return last_error;
    }
    let prompt = format!("{}> ", crate::common::prog());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    while !s.quit {
        s.out.print(&prompt);
        s.out.flush();
        let mut line = Vec::new();
        match lines.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let r = cmds::run(s, &text);
        if r < 0 {
            last_error = r;
        }
    }
    last_error
}

pub(crate) use crate::errmap::strerror;
