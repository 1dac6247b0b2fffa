//! `bitmap (--add | --remove | --clear | --enable | --disable | --merge SRC)... [-g GRANULARITY]
//! [-f FMT] FILE BITMAP`: edit qcow2 persistent dirty bitmaps. Operations run in the
//! order add, clear, merge, enable, disable, remove; `--merge` takes its source from the
//! same image or, with `-b SOURCE_FILE [-F FMT]`, from another qcow2 image.

use anyhow::{Context, Result, bail};
use diskimg::qcow2::BitmapOp;

use crate::common::{opt_format, parse_size};

/// Arguments of `bitmap`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Create the bitmap (enabled unless --disable is given too).
    #[arg(long = "add")]
    add: bool,
    /// Delete the bitmap.
    #[arg(long = "remove")]
    remove: bool,
    /// Clear every bit.
    #[arg(long = "clear")]
    clear: bool,
    /// Make the bitmap track writes.
    #[arg(long = "enable")]
    enable: bool,
    /// Stop tracking writes.
    #[arg(long = "disable")]
    disable: bool,
    /// Merge bitmap SOURCE of the same image into this one.
    #[arg(long = "merge")]
    merge: Option<String>,
    /// Image holding the --merge source bitmap (default: FILE).
    #[arg(short = 'b')]
    source_file: Option<String>,
    /// Format of the -b image.
    #[arg(short = 'F')]
    source_format: Option<String>,
    /// Granularity for --add (bytes per bit; default the cluster size).
    #[arg(short = 'g')]
    granularity: Option<String>,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// The image.
    file: String,
    /// The bitmap's name.
    bitmap: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let mut ops = Vec::new();
    if a.add {
        let granularity = a.granularity.as_deref().map(parse_size).transpose()?;
        ops.push(BitmapOp::Add {
            granularity,
            enabled: true,
        });
    }
    if a.clear {
        ops.push(BitmapOp::Clear);
    }
    if let Some(src) = &a.merge {
        match &a.source_file {
            None => ops.push(BitmapOp::Merge(src.clone())),
            Some(f) => {
                let fmt = opt_format(a.source_format.as_deref(), f)?;
                if fmt.is_some_and(|f| f != diskimg::Format::Qcow2) {
                    bail!(
                        "Operation merge on bitmap {} failed: Dirty bitmap '{src}' not found",
                        a.bitmap
                    );
                }
                let storage = std::sync::Arc::new(
                    diskimg::blockio::FileStorage::open(f, true)
                        .with_context(|| format!("Could not open '{f}'"))?,
                );
                let (granularity, bits) =
                    diskimg::qcow2::read_bitmap(storage, src).map_err(|e| {
                        anyhow::anyhow!("Operation merge on bitmap {} failed: {e}", a.bitmap)
                    })?;
                ops.push(BitmapOp::MergeBits { granularity, bits });
            }
        }
    }
    if a.enable {
        ops.push(BitmapOp::Enable);
    }
    if a.disable {
        ops.push(BitmapOp::Disable);
    }
    if a.remove {
        ops.push(BitmapOp::Remove);
    }
    if ops.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    let format = opt_format(a.format.as_deref(), &a.file)?;
    diskimg::maint::edit_bitmaps(std::path::Path::new(&a.file), format, &a.bitmap, &ops)?;
    Ok(0)
}
