//! A qemu-io command's description (`cmdinfo_t`) and the two messages every command
//! prints for a bad invocation. The table of commands is in `cmds.rs`.

use super::num::parse_pattern;
use super::session::{EINVAL, Session};

/// A command's handler: the session and its words (the command name first); returns 0
/// or a negative errno, as qemu-io's.
type Handler = fn(&mut Session, &str, &[String]) -> i32;

/// One command, as qemu-io's `cmdinfo_t`.
pub(super) struct Cmd {
    pub(super) name: &'static str,
    pub(super) alt: Option<&'static str>,
    pub(super) func: Handler,
    pub(super) argmin: i32,
    /// -1: no maximum.
    pub(super) argmax: i32,
    /// Runs without an open image (`open`, `sleep`, `sigraise`, `abort`).
    pub(super) nofile_ok: bool,
    /// Runs whatever the state (`help`, `quit`).
    pub(super) global: bool,
    /// Needs write permission (`write`, `discard`, `truncate`, …).
    pub(super) write: bool,
    /// The operand synopsis (`None`: qemu-io's NULL, not printed by `help`).
    pub(super) args: Option<&'static str>,
    pub(super) oneline: &'static str,
    pub(super) help: Option<&'static str>,
}

impl Cmd {
    /// A command with no flags, argument counts 0..=0 and no help text.
    pub(super) const fn new(name: &'static str, func: Handler, oneline: &'static str) -> Self {
        Cmd {
            name,
            alt: None,
            func,
            argmin: 0,
            argmax: 0,
            nofile_ok: false,
            global: false,
            write: false,
            args: None,
            oneline,
            help: None,
        }
    }
}

/// Prints `NAME ARGS -- ONELINE` (qemu-io's usage line for a bad invocation).
pub(super) fn usage(s: &mut Session, c: &Cmd) {
    s.out.print(&format!(
        "{} {} -- {}\n",
        c.name,
        c.args.unwrap_or("(null)"),
        c.oneline
    ));
}

/// The byte of a `-P` option (qemu-io's `parse_pattern`); for a bad one, prints qemu-io's
/// message and gives the command's return value, `-EINVAL`.
pub(super) fn pattern_opt(s: &mut Session, arg: Option<String>) -> Result<u8, i32> {
    parse_pattern(&arg.unwrap_or_default()).map_err(|m| {
        s.out.print(&m);
        -EINVAL
    })
}

/// Prints a getopt error (stderr) and the command's usage line; returns `-EINVAL`.
pub(super) fn bad_option(s: &mut Session, c: &Cmd, msg: &str) -> i32 {
    s.out.err(&format!("{msg}\n"));
    usage(s, c);
    -EINVAL
}
