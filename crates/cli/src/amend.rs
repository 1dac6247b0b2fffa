//! `amend [-f FMT] [-p] [-q] [-t CACHE] [--force] -o OPTIONS FILE`: change options of an
//! existing image (qcow2: compat, lazy_refcounts, size).

use anyhow::{Result, anyhow, bail};
use diskimg::OptionList;

use crate::common::{open_image, opt_format};

/// Arguments of `amend`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// The options to change.
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Show progress (accepted).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode (accepted).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Allow dangerous changes (accepted; only encryption options use it in qemu).
    #[arg(long = "force")]
    force: bool,
    /// The image.
    file: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = (a.progress, a.quiet, &a.cache, a.force);
    if a.options.is_empty() {
        bail!("Must specify options (-o)\nTry 'diskimg amend --help' for more info");
    }
    let mut opts = OptionList::new();
    for o in &a.options {
        opts.extend_from(o).map_err(|e| anyhow!("{e}"))?;
    }
    let format = opt_format(a.format.as_deref(), &a.file)?;
    let img = open_image(&a.file, format, false, false)?;
    diskimg::maint::amend(&img, &opts)?;
    img.device.flush()?;
    Ok(0)
}
