//! `amend [--object …] [--image-opts] [-f FMT] [-p] [-q] [-t CACHE] [--force] -o OPTIONS FILE`:
//! change options of an existing image — qcow2 `compat`, `lazy_refcounts`, `size`, and LUKS
//! key-slot management (`encrypt.state`, `encrypt.new-secret`, `encrypt.old-secret`,
//! `encrypt.keyslot`, `encrypt.iter-time`).

use anyhow::{Result, anyhow, bail};
use diskimg::OptionList;

use crate::common::{Progress, open_image, opt_format};

/// Arguments of `amend`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// The options to change (may repeat).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode (accepted).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Allow dangerous changes (accepted).
    #[arg(long = "force")]
    force: bool,
    /// The image.
    file: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = &a.cache;
    if a.options.is_empty() {
        bail!("Must specify options (-o)\nTry 'diskimg amend --help' for more info");
    }
    // As qemu: progress starts before the image opens; 0% and 100% around the change.
    let bar = Progress::new(a.progress && !a.quiet, 1.0);
    let mut all = OptionList::new();
    for o in &a.options {
        all.extend_from(o).map_err(|e| anyhow!("{e}"))?;
    }
    let format = opt_format(a.format.as_deref(), &a.file)?;
    let img = open_image(&a.file, format, false, false)?;
    if !all.is_empty() {
        // Refused before any progress, as qemu does for drivers without amend; options
        // the format cannot amend fail in its option parsing, also before any progress
        // (nothing is changed).
        diskimg::maint::amender(&img)?.check_options(&all)?;
    }
    bar.print(0.0, 0);
    // As qemu: 100% is reported whether or not the change worked.
    let amended = if all.is_empty() {
        Ok(())
    } else {
        diskimg::maint::amend_forced(&img, &all, &crate::secrets::secrets(), a.force)
    };
    bar.print(100.0, 0);
    amended?;
    img.close()?;
    bar.end();
    Ok(0)
}
