//! GNU `getopt`/`getopt_long` as qemu-io uses them, for its own options and for every
//! command's flags: clustered flags (`-pP 0xa`), attached arguments (`-P0xa`), options
//! after operands (argument permutation), `--` ending the options, and long options with
//! unique-prefix abbreviations (`--cache=none`, `--cach none`).
//!
//! Parsing is eager ([`parse`] returns every option event in order plus the operands), but
//! an error is only an event: glibc prints its message when the caller's loop reaches the
//! bad option, so a command that fails earlier (a bad pattern) prints nothing about later
//! ones. Callers print [`Event::Error`] texts to stderr when they reach them.

/// A long option: name, whether it takes an argument, and the short letter (or code) it
/// stands for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LongOpt {
    /// The name without dashes.
    pub(crate) name: &'static str,
    /// True when the option takes an argument.
    pub(crate) has_arg: bool,
    /// The option code reported for it.
    pub(crate) code: char,
}

/// One result of option parsing, in command-line order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// An option with its argument, if it takes one.
    Opt(char, Option<String>),
    /// A parse error: glibc's message (without a trailing newline), printed by the
    /// caller to stderr; the caller then behaves as for getopt's `'?'`.
    Error(String),
}

/// The options and the operands (in their original order) of `args` (without the
/// program or command name). `prog` prefixes error messages as glibc's `argv[0]`.
pub(crate) fn parse(
    prog: &str,
    args: &[String],
    shorts: &str,
    longs: &[LongOpt],
) -> (Vec<Event>, Vec<String>) {
    let mut events = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        i += 1;
        if arg == "--" {
            operands.extend(args.iter().skip(i).cloned());
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            events.push(parse_long(prog, long, args, &mut i, longs));
            continue;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            operands.push(arg.clone());
            continue;
        };
        for (pos, c) in cluster.char_indices() {
            match short_spec(shorts, c) {
                None => {
                    events.push(Event::Error(format!("{prog}: invalid option -- '{c}'")));
                }
                Some(false) => events.push(Event::Opt(c, None)),
                Some(true) => {
                    let rest = cluster.get(pos + c.len_utf8()..).unwrap_or("");
                    if !rest.is_empty() {
                        events.push(Event::Opt(c, Some(rest.to_string())));
                    } else if let Some(next) = args.get(i) {
                        i += 1;
                        events.push(Event::Opt(c, Some(next.clone())));
                    } else {
                        events.push(Event::Error(format!(
                            "{prog}: option requires an argument -- '{c}'"
                        )));
                    }
                    break;
                }
            }
        }
    }
    (events, operands)
}

/// Whether `c` is an option of `shorts` and takes an argument (`None`: unknown).
fn short_spec(shorts: &str, c: char) -> Option<bool> {
    if c == ':' {
        return None;
    }
    let pos = shorts.find(c)?;
    Some(
        shorts
            .get(pos + c.len_utf8()..)
            .is_some_and(|r| r.starts_with(':')),
    )
}

fn parse_long(prog: &str, text: &str, args: &[String], i: &mut usize, longs: &[LongOpt]) -> Event {
    let (name, inline) = match text.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (text, None),
    };
    let exact = longs.iter().find(|l| l.name == name);
    let opt = match exact {
        Some(o) => *o,
        None => {
            let matches: Vec<&LongOpt> =
                longs.iter().filter(|l| l.name.starts_with(name)).collect();
            match matches.as_slice() {
                [] => return Event::Error(format!("{prog}: unrecognized option '--{name}'")),
                [one] => **one,
                [first, rest @ ..]
                    if rest
                        .iter()
                        .all(|o| o.code == first.code && o.has_arg == first.has_arg) =>
                {
                    **first
                }
                many => {
                    let list: Vec<String> =
                        many.iter().map(|o| format!("'--{}'", o.name)).collect();
                    return Event::Error(format!(
                        "{prog}: option '--{name}' is ambiguous; possibilities: {}",
                        list.join(" ")
                    ));
                }
            }
        }
    };
    match (opt.has_arg, inline) {
        (false, Some(_)) => Event::Error(format!(
            "{prog}: option '--{}' doesn't allow an argument",
            opt.name
        )),
        (false, None) => Event::Opt(opt.code, None),
        (true, Some(v)) => Event::Opt(opt.code, Some(v)),
        (true, None) => match args.get(*i) {
            Some(v) => {
                *i += 1;
                Event::Opt(opt.code, Some(v.clone()))
            }
            None => Event::Error(format!(
                "{prog}: option '--{}' requires an argument",
                opt.name
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_string()).collect()
    }

    #[test]
    fn clusters_attached_and_permuted() {
        let (ev, ops) = parse(
            "read",
            &v(&["-pP", "0xa", "0", "-P0xb", "512", "-q"]),
            "bCl:pP:qrs:v",
            &[],
        );
        assert_eq!(
            ev,
            vec![
                Event::Opt('p', None),
                Event::Opt('P', Some("0xa".into())),
                Event::Opt('P', Some("0xb".into())),
                Event::Opt('q', None),
            ]
        );
        assert_eq!(ops, v(&["0", "512"]));
        let (ev, ops) = parse("read", &v(&["-x", "--", "-1", "2"]), "q", &[]);
        assert_eq!(ev, vec![Event::Error("read: invalid option -- 'x'".into())]);
        assert_eq!(ops, v(&["-1", "2"]));
        let (ev, _) = parse("write", &v(&["-P"]), "P:", &[]);
        assert_eq!(
            ev,
            vec![Event::Error(
                "write: option requires an argument -- 'P'".into()
            )]
        );
    }

    #[test]
    fn long_options_and_abbreviations() {
        let longs = [
            LongOpt {
                name: "cache",
                has_arg: true,
                code: 't',
            },
            LongOpt {
                name: "cmd",
                has_arg: true,
                code: 'c',
            },
            LongOpt {
                name: "copy-on-read",
                has_arg: false,
                code: 'C',
            },
        ];
        let (ev, ops) = parse(
            "qemu-io",
            &v(&["--cache=none", "--cach", "wb", "--copy", "f"]),
            "",
            &longs,
        );
        assert_eq!(
            ev,
            vec![
                Event::Opt('t', Some("none".into())),
                Event::Opt('t', Some("wb".into())),
                Event::Opt('C', None)
            ]
        );
        assert_eq!(ops, v(&["f"]));
        let (ev, _) = parse("qemu-io", &v(&["--c"]), "", &longs);
        assert!(matches!(&ev[0], Event::Error(e) if e.contains("ambiguous")));
        let (ev, _) = parse("qemu-io", &v(&["--bogus"]), "", &longs);
        assert_eq!(
            ev,
            vec![Event::Error(
                "qemu-io: unrecognized option '--bogus'".into()
            )]
        );
    }
}
