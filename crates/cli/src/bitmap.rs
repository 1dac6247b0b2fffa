//! `bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC)... [-g GRANULARITY]
//! [-b SOURCE_FILE [-F FMT]] [-f FMT] FILE BITMAP`: edit qcow2 persistent dirty bitmaps.
//! As qemu-img, the operations run in command-line order (each may repeat); the first
//! that fails stops the rest (`Operation OP on bitmap B failed: …`), the ones before it
//! stay done. `--merge` takes its source from the same image or, with `-b SOURCE_FILE
//! [-F FMT]`, from another qcow2 image; `-g` (the last one given) applies to every `--add`.

use anyhow::{Context, Result, bail};
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
    let apply = |ops: &[BitmapOp]| {
        let drivers = crate::io::blkdebug::node_drivers();
        diskimg::maint::edit_bitmaps_named_then_close(&a.file, format, &drivers, &a.bitmap, ops)
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
                Ok(op) => op,
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
    crate::close_errors::finish_bitmap(done, closed)
}

/// A `--merge SRC`: from this image, or read from the `-b` image.
fn merge_op(a: &Args, src: &str) -> Result<BitmapOp> {
    let Some(f) = &a.source_file else {
        return Ok(BitmapOp::Merge(src.to_string()));
    };
    let fmt = opt_format(a.source_format.as_deref(), f)?;
    if fmt.is_some_and(|f| f != diskimg::Format::Qcow2) {
        bail!(
            "Operation merge on bitmap {} failed: Dirty bitmap '{src}' not found",
            a.bitmap
        );
    }
    let drivers = crate::io::blkdebug::node_drivers();
    let (storage, _) = diskimg::maint::bitmap_file(f, &drivers, true)
        .with_context(|| format!("Could not open '{f}'"))?;
    let data = diskimg::maint::read_bitmap(storage, src)
        .map_err(|e| anyhow::anyhow!("Operation merge on bitmap {} failed: {e}", a.bitmap))?;
    Ok(BitmapOp::MergeBits {
        granularity: data.granularity,
        bits: data.bits,
    })
}
