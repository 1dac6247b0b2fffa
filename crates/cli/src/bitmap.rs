//! `bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC)... [-g GRANULARITY]
//! [-b SOURCE_FILE [-F FMT]] [-f FMT] FILE BITMAP`: edit qcow2 persistent dirty bitmaps.
//! As qemu-img, the operations run in command-line order (each may repeat); the first
//! that fails stops the rest (`Operation OP on bitmap B failed: …`), the ones before it
//! stay done. `--merge` takes its source from the same image or, with `-b SOURCE_FILE
//! [-F FMT]`, from another qcow2 image; `-g` (the last one given) applies to every `--add`.

use anyhow::{Result, bail};
use clap::ArgAction;
use diskimg::blockio::BitmapOp;

use crate::args::FormatArg;
use crate::common::{opt_format, parse_size};

/// Arguments of `bitmap`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Create the bitmap (enabled unless --disable is given too).
    #[arg(long = "add", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    add: Vec<bool>,
    /// Delete the bitmap.
    #[arg(long = "remove", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    remove: Vec<bool>,
    /// Clear every bit.
    #[arg(long = "clear", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    clear: Vec<bool>,
    /// Make the bitmap track writes.
    #[arg(long = "enable", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    enable: Vec<bool>,
    /// Stop tracking writes.
    #[arg(long = "disable", action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    disable: Vec<bool>,
    /// Merge bitmap SOURCE of the same image into this one.
    #[arg(long = "merge", action = ArgAction::Append)]
    merge: Vec<String>,
    /// Image holding the --merge source bitmap (default: FILE).
    #[arg(short = 'b')]
    source_file: Option<String>,
    /// Format of the -b image.
    #[arg(short = 'F')]
    source_format: Option<String>,
    /// Granularity for --add (bytes per bit; default the cluster size; the last wins).
    #[arg(short = 'g', long = "granularity", action = ArgAction::Append)]
    granularity: Vec<String>,
    #[command(flatten)]
    format: FormatArg,
    /// The image.
    file: String,
    /// The bitmap's name.
    bitmap: String,
}

/// One operation as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Act {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

/// The operations in command-line order (from the parser's argument indices); without
/// them, qemu-img's getopt order cannot be recovered and a fixed order is used.
fn actions(a: &Args, m: Option<&clap::ArgMatches>) -> Vec<Act> {
    let flags = [
        ("add", a.add.len(), Act::Add),
        ("remove", a.remove.len(), Act::Remove),
        ("clear", a.clear.len(), Act::Clear),
        ("merge", 0, Act::Add),
        ("enable", a.enable.len(), Act::Enable),
        ("disable", a.disable.len(), Act::Disable),
    ];
    let mut v: Vec<(usize, Act)> = Vec::new();
    for (id, count, act) in flags {
        let idx: Vec<usize> = m
            .and_then(|m| m.indices_of(id))
            .map(Iterator::collect)
            .unwrap_or_default();
        if id == "merge" {
            for (k, src) in a.merge.iter().enumerate() {
                let at = idx.get(k).copied().unwrap_or(usize::MAX / 2);
                v.push((at, Act::Merge(src.clone())));
            }
            continue;
        }
        for k in 0..count {
            v.push((idx.get(k).copied().unwrap_or(usize::MAX / 2), act.clone()));
        }
    }
    // Stable: the fallback keeps add, remove, clear, merge, enable, disable.
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, act)| act).collect()
}

pub(crate) fn run(a: Args, m: Option<&clap::ArgMatches>) -> Result<i32> {
    let acts = actions(&a, m);
    if acts.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    if !a.granularity.is_empty() && a.add.is_empty() {
        bail!("granularity only supported with --add");
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    if a.source_file.is_some() && a.merge.is_empty() {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let granularity = a.granularity.last().map(|g| parse_size(g)).transpose()?;
    let format = a.format.of(&a.file)?;
    if let Some(e) = crate::names::protocol_error(&a.file, false) {
        return Err(open_failure(&a.file, e, true).into());
    }
    let file = crate::names::host_path(&a.file);
    let apply = |ops: &[BitmapOp]| {
        let drivers = crate::io::blkdebug::node_drivers();
        diskimg::maint::edit_bitmaps_named_then_close(&file, format, &drivers, &a.bitmap, ops)
    };
    let mut ops = Vec::new();
    for act in acts {
        ops.push(match act {
            Act::Add => BitmapOp::Add {
                granularity,
                enabled: true,
            },
            Act::Remove => BitmapOp::Remove,
            Act::Clear => BitmapOp::Clear,
            Act::Enable => BitmapOp::Enable,
            Act::Disable => BitmapOp::Disable,
            Act::Merge(src) => match merge_op(&a, &src) {
                Ok(Ok(op)) => op,
                Ok(Err(lookup)) => {
                    return merge_failed(lookup, apply(&ops), || target_missing(&a, &file));
                }
                Err(e) => {
                    // As qemu: the image is open (and the operations before the failing
                    // merge done) before the merge's error, which comes before what
                    // closing the image reports.
                    let (done, closed) = apply(&ops);
                    if let Err(done) = done {
                        return crate::close_errors::finish_bitmap(Err(done), closed);
                    }
                    if closed.is_ok() {
                        return Err(e);
                    }
                    eprintln!("{}: {}", crate::common::prog(), crate::errmap::message(&e));
                    return crate::close_errors::finish_bitmap(Ok(()), closed).map(|_| 1);
                }
            },
        });
    }
    // An edit's failure, and a bitmap that could not be stored at close, are reported as
    // qemu-img reports them (see [`crate::close_errors`]).
    let (done, closed) = apply(&ops);
    let done = done.map_err(|e| open_failure(&a.file, e, closed.is_ok()));
    crate::close_errors::finish_bitmap(done, closed)
}

/// Reports a `--merge` whose source bitmap was not read (`e`), after the operations
/// before it (`applied`: their result and the close's). As qemu, which looks the
/// target bitmap up first, a target that does not exist (`target_missing`, asked after
/// those operations closed cleanly) is the error reported.
fn merge_failed(
    e: anyhow::Error,
    applied: (diskimg::Result<()>, diskimg::Result<()>),
    target_missing: impl FnOnce() -> Option<anyhow::Error>,
) -> Result<i32> {
    let (done, closed) = applied;
    if let Err(done) = done {
        return crate::close_errors::finish_bitmap(Err(done), closed);
    }
    if closed.is_ok() {
        // (The image as stored is the image qemu has open only after a clean close.)
        return Err(target_missing().unwrap_or(e));
    }
    eprintln!("{}: {}", crate::common::prog(), crate::errmap::message(&e));
    crate::close_errors::finish_bitmap(Ok(()), closed).map(|_| 1)
}

/// qemu's error for a `--merge` whose target bitmap is not in the image `file` (a
/// qcow2 image read as it is now), if it is not.
fn target_missing(a: &Args, file: &str) -> Option<anyhow::Error> {
    let drivers = crate::io::blkdebug::node_drivers();
    let (storage, named) = diskimg::maint::bitmap_file(file, &drivers, true).ok()?;
    let given = a.format.of(&a.file).ok().flatten();
    let missing = stored_bitmap(storage, given.or(named), &a.bitmap)
        .is_none_or(|r| r.is_err_and(|e| e.to_string().ends_with(" not found")));
    missing.then(|| {
        anyhow::anyhow!(
            "Operation merge on bitmap {0} failed: Dirty bitmap '{0}' not found",
            a.bitmap
        )
    })
}

/// qemu opens the image before any operation, and reports a failure to open it as
/// `Could not open 'FILE': REASON` (a missing file: `Could not open 'FILE': Could not
/// open 'PATH': No such file or directory`); the operations' own refusals start with
/// `Operation`. `closed`: the image was not open or closed cleanly.
fn open_failure(file: &str, e: diskimg::Error, closed: bool) -> diskimg::Error {
    let op = match &e {
        diskimg::Error::Unsupported { what, .. } => what.starts_with("Operation "),
        e => e.to_string().starts_with("Operation "),
    };
    if op || !closed {
        return e;
    }
    diskimg::Error::invalid(format!(
        "Could not open '{file}': {}",
        crate::errmap::message(&capitalized(e))
    ))
}

/// The file layer's `could not open 'PATH'` in qemu's words (`Could not open`).
pub(crate) fn capitalized(e: diskimg::Error) -> anyhow::Error {
    match e {
        diskimg::Error::Io { context, source } if context.starts_with("could not open ") => {
            let c = format!("C{}", context.get(1..).unwrap_or_default());
            anyhow::Error::from(source).context(c)
        }
        e => e.into(),
    }
}

/// A `--merge SRC`: from this image, or read from the `-b` image (opened as `-F`, the
/// format its `json:` name gives, or the probed one; a format without bitmaps has no
/// `SRC`). `Err`: the `-b` image did not open; `Ok(Err)`: `SRC` was not read from it.
fn merge_op(a: &Args, src: &str) -> Result<Result<BitmapOp>> {
    let Some(f) = &a.source_file else {
        return Ok(Ok(BitmapOp::Merge(src.to_string())));
    };
    let given = opt_format(a.source_format.as_deref(), f)?;
    let drivers = crate::io::blkdebug::node_drivers();
    if let Some(e) = crate::names::protocol_error(f, false) {
        return Err(open_failure(f, e, true).into());
    }
    let (storage, named) = diskimg::maint::bitmap_file(&crate::names::host_path(f), &drivers, true)
        .map_err(|e| anyhow::Error::from(open_failure(f, e, true)))?;
    let failed =
        |why: String| anyhow::anyhow!("Operation merge on bitmap {} failed: {why}", a.bitmap);
    Ok(match stored_bitmap(storage, given.or(named), src) {
        None => Err(failed(format!("Dirty bitmap '{src}' not found"))),
        Some(Ok(data)) => Ok(BitmapOp::MergeBits {
            granularity: data.granularity,
            bits: data.bits,
        }),
        Some(Err(e @ (diskimg::Error::NotThisFormat { .. } | diskimg::Error::Corrupt { .. }))) => {
            return Err(open_failure(f, e, true).into());
        }
        Some(Err(e)) => Err(failed(crate::errmap::message(&e.into()))),
    })
}

/// Reads bitmap `name` of the image in `storage`, of format `format` or else the probed
/// one; `None` when that format has no bitmaps (only qcow2 stores them).
fn stored_bitmap(
    storage: std::sync::Arc<dyn diskimg::Storage>,
    format: Option<diskimg::Format>,
    name: &str,
) -> Option<diskimg::Result<diskimg::blockio::BitmapData>> {
    let fmt = format.unwrap_or_else(|| diskimg::probe(storage.as_ref()));
    (fmt == diskimg::Format::Qcow2).then(|| diskimg::maint::read_bitmap(storage, name))
}
