//! `diskimg`: a qemu-img compatible command-line tool for disk images.
//!
//! Verbs, options, output and exit codes follow qemu-img 10 (see `docs/cli.md`):
//! `create`, `info`, `convert`, `compare`, `map`, `check`, `resize`, `snapshot`,
//! `commit`, `rebase`, `amend` (format options and LUKS key slots), `measure`, `bitmap`,
//! `dd`, `bench`, and `io` (qemu-io's commands); beyond qemu-img: `inspect`, `checksum`
//! and `serve`. Errors are printed as `diskimg: <message>` (`qemu-img: …` /
//! `qemu-io: …` when invoked through a symlink of that name) and exit 1 unless the verb
//! defines other codes (check, compare).

mod amend;
mod args;
mod bench;
mod bitmap;
mod check;
mod checksum;
mod close_errors;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
mod dd;
mod errmap;
mod formatting;
mod imgspec;
mod info;
mod inspect;
mod io;
mod json;
mod layers;
mod map;
mod measure;
mod names;
mod nodes;
mod opening;
mod optlist;
mod quorum;
mod rebase;
mod resize;
mod secrets;
mod serve;
mod snapshot;
mod source;
mod stream_progress;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use errmap::is_broken_pipe;
pub(crate) use errmap::message;

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "diskimg",
    version,
    about = "qemu-img compatible disk image tool",
    // As qemu-img's getopt: a repeated option's last value wins (`-f foo -f qcow2`).
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    global: secrets::GlobalArgs,
    #[command(flatten)]
    sources: source::SourceArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a new image.
    Create(create::Args),
    /// Time I/O requests on an image (qemu-img bench).
    Bench(bench::Args),
    /// Show information about an image.
    Info(info::Args),
    /// Check an untrusted image without opening any other file: verdict and reasons.
    Inspect(inspect::Args),
    /// Convert (copy) images to another format.
    Convert(convert::Args),
    /// Compare the guest content of two images.
    Compare(compare::Args),
    /// Show where the data of an image lives.
    Map(map::Args),
    /// Check the metadata of an image.
    Check(check::Args),
    /// Digest of the guest content (blkhash/blksum-compatible, sha256, blake3).
    Checksum(checksum::Args),
    /// Change the virtual size of an image.
    Resize(resize::Args),
    /// Copy blocks from one image into a new one, dd-style.
    Dd(dd::Args),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::Args),
    /// Measure the file size a new image would need.
    Measure(measure::Args),
    /// Commit an image's content into its backing file.
    Commit(commit::Args),
    /// Change the backing file of an image.
    Rebase(rebase::Args),
    /// Change options of an existing image.
    Amend(amend::Args),
    /// Add, remove, clear, enable or disable a persistent dirty bitmap (qcow2).
    Bitmap(bitmap::Args),
    /// qemu-io: run I/O commands (read, write, aio_*, map, open, …) on an image.
    Io(IoArgs),
    /// Export an image over NBD (qemu-nbd's flags).
    Serve(serve::Args),
}

/// `io`'s arguments: parsed by qemu-io's own getopt rules (see `io`), listed here for
/// `--help` only.
#[derive(clap::Args, Debug)]
struct IoArgs {
    /// qemu-io's options, `-c` commands and the image.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<i32> {
    secrets::init(&cli.global)?;
    source::init(&cli.sources)?;
    match cli.cmd {
        Cmd::Create(a) => create::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Inspect(a) => inspect::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Map(a) => map::run(a),
        Cmd::Check(a) => check::run(a),
        Cmd::Checksum(a) => checksum::run(a),
        Cmd::Resize(a) => resize::run(a),
        Cmd::Dd(a) => dd::run(a),
        Cmd::Io(a) => Ok(io::main("diskimg", &a.args)),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Measure(a) => measure::run(a),
        Cmd::Amend(a) => amend::run(a),
        Cmd::Bitmap(a) => bitmap::run(a, matches.subcommand_matches("bitmap")),
        Cmd::Commit(a) => commit::run(a),
        Cmd::Rebase(a) => rebase::run(a),
        Cmd::Serve(a) => serve::run(a),
    }
}

fn main() {
    // qemu's block drivers print their corruption events themselves (qcow2's
    // "Marking image as corrupt" line); the libraries report them here.
    diskimg_blockio::set_corruption_reporter(errmap::report_corruption);
    diskimg_blockio::set_failure_reporter(errmap::report_failure);
    // qemu-io's command line is not clap's (getopt permutation, clustered flags): invoked
    // as `qemu-io` (a symlink, how a drop-in is installed) or as `diskimg io`, it has its
    // own parser.
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    if common::prog() == "qemu-io" {
        std::process::exit(io::main(&argv0, args.get(1..).unwrap_or(&[])));
    }
    if args.get(1).map(String::as_str) == Some("io") {
        std::process::exit(io::main(&argv0, args.get(2..).unwrap_or(&[])));
    }
    // The matches stay available for what derive loses: the order of options (bitmap).
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|c| (c, m)));
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                std::process::exit(1);
            }
            let text = e.render().to_string();
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            let mut first = lines.next().unwrap_or("invalid arguments").to_string();
            if first.ends_with(':')
                && let Some(next) = lines.next()
            {
                first = format!("{first} {}", next.trim());
            }
            eprintln!(
                "{}: {}",
                common::prog(),
                first.strip_prefix("error: ").unwrap_or(&first)
            );
            std::process::exit(1);
        }
    };
    let code = match run(cli, &matches) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => 0,
        Err(e) => {
            eprintln!("{}: {}", common::prog(), message(&e));
            1
        }
    };
    std::process::exit(code);
}
