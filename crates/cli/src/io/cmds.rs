//! The command table and dispatch (`qemuio_command`): splitting a line into words,
//! finding the command by name or alias, the "no file open" and argument-count checks,
//! the write-permission check, and `help`.

use super::cmd::Cmd;
use super::session::{EINVAL, Session};

/// Every command, sorted by name (as qemu-io keeps its table).
fn table() -> Vec<&'static Cmd> {
    let mut v: Vec<&'static Cmd> = Vec::new();
    v.extend(super::rw::COMMANDS);
    v.extend(super::write::COMMANDS);
    v.extend(super::aio::COMMANDS);
    v.extend(super::breaks::COMMANDS);
    v.extend(super::misc::COMMANDS);
    v.extend(super::open::COMMANDS);
    v.extend(GLOBAL_COMMANDS);
    v.sort_by_key(|c| c.name);
    v
}

fn find(name: &str) -> Option<&'static Cmd> {
    table()
        .into_iter()
        .find(|c| c.name == name || c.alt == Some(name))
}

/// Runs one command line; returns 0 or a negative errno.
pub(super) fn run(s: &mut Session, line: &str) -> i32 {
    let words: Vec<String> = line
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    let Some((first, args)) = words.split_first() else {
        return 0;
    };
    let Some(c) = find(first) else {
        s.out.err(&format!("command \"{first}\" not found\n"));
        return -EINVAL;
    };
    // Completions of earlier asynchronous requests are reported before anything else
    // happens (qemu-io's main loop runs them while a later request waits) — but not
    // before commands that submit more or steer requests suspended at a blkdebug
    // breakpoint (those may be among them), nor before `sleep` (which waits beside them).
    s.print_notes();
    if !matches!(
        c.name,
        "aio_read" | "aio_write" | "break" | "wait_break" | "resume" | "remove_break" | "sleep"
    ) {
        s.drain();
    }
    if !c.global && !c.nofile_ok && s.blk.is_none() {
        s.out.err("no file open, try 'help open'\n");
        return -EINVAL;
    }
    let argc = i32::try_from(words.len() - 1).unwrap_or(i32::MAX);
    if argc < c.argmin || (c.argmax != -1 && argc > c.argmax) {
        let msg = if c.argmax == -1 {
            format!(
                "bad argument count {argc} to {first}, expected at least {} arguments\n",
                c.argmin
            )
        } else if c.argmin == c.argmax {
            format!(
                "bad argument count {argc} to {first}, expected {} arguments\n",
                c.argmin
            )
        } else {
            format!(
                "bad argument count {argc} to {first}, expected between {} and {} arguments\n",
                c.argmin, c.argmax
            )
        };
        s.out.err(&msg);
        return -EINVAL;
    }
    if c.write && s.blk.as_ref().is_some_and(|b| b.read_only) {
        s.out.error("Block node is read-only");
        return -1;
    }
    if let Some(b) = s.blk.as_ref().filter(|_| c.write) {
        b.written.set(true);
    }
    let r = (c.func)(s, first, args);
    s.print_notes();
    r
}

fn help_line(c: &Cmd, name: &str) -> String {
    let mut l = format!("{name} ");
    if let Some(a) = c.args {
        l.push_str(a);
        l.push(' ');
    }
    l.push_str(&format!("-- {}\n", c.oneline));
    l
}

fn help_f(s: &mut Session, _name: &str, args: &[String]) -> i32 {
    let Some(name) = args.first() else {
        let mut t = String::new();
        for c in table() {
            t.push_str(&help_line(c, c.name));
        }
        t.push_str("\nUse 'help commandname' for extended help.\n");
        s.out.print(&t);
        return 0;
    };
    let Some(c) = find(name) else {
        s.out.print(&format!("command {name} not found\n"));
        return -EINVAL;
    };
    let mut t = help_line(c, name);
    if let Some(h) = c.help {
        t.push_str(h);
    }
    s.out.print(&t);
    0
}

fn quit_f(s: &mut Session, _name: &str, _args: &[String]) -> i32 {
    s.quit = true;
    0
}

/// `help` and `quit`.
pub(super) static GLOBAL_COMMANDS: &[&Cmd] = &[&HELP, &QUIT];

static HELP: Cmd = Cmd {
    alt: Some("?"),
    argmax: 1,
    global: true,
    args: Some("[command]"),
    ..Cmd::new("help", help_f, "help for one or all commands")
};

static QUIT: Cmd = Cmd {
    alt: Some("q"),
    argmin: -1,
    argmax: -1,
    global: true,
    ..Cmd::new("quit", quit_f, "exit the program")
};
