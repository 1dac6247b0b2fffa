//! `amend [--object …] [--image-opts] [-f FMT] [-p] [-q] [-t CACHE] [--force] -o OPTIONS FILE`:
//! change options of an existing image — qcow2 `compat`, `lazy_refcounts`, `size`, and LUKS
//! key-slot management (`encrypt.state`, `encrypt.new-secret`, `encrypt.old-secret`,
//! `encrypt.keyslot`, `encrypt.iter-time`).

use anyhow::{Result, anyhow, bail};
use diskimg::{Format, OptionList};
use diskimg_qcow2::Qcow2Device;

use crate::common::{Progress, open_image, opt_format};

/// The options qemu's qcow2 driver lists for amendment (besides `encrypt.*`).
const AMENDABLE: &[&str] = &[
    "compat",
    "lazy_refcounts",
    "refcount_bits",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "size",
];

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
    let _ = (&a.cache, a.force);
    if a.options.is_empty() {
        bail!("Must specify options (-o)\nTry 'diskimg amend --help' for more info");
    }
    // As qemu: progress starts before the image opens; 0% and 100% around the change.
    let bar = Progress::new(a.progress && !a.quiet, 1.0);
    let mut all = OptionList::new();
    for o in &a.options {
        all.extend_from(o).map_err(|e| anyhow!("{e}"))?;
    }
    // Key-slot options go to the encryption layer, the rest to the format's amend.
    let (mut enc, mut plain) = (OptionList::new(), OptionList::new());
    for (k, v) in all.entries() {
        if k.starts_with("encrypt.") {
            enc.set(k, v);
        } else {
            plain.set(k, v);
        }
    }
    let format = opt_format(a.format.as_deref(), &a.file)?;
    let img = open_image(&a.file, format, false, false)?;
    if img.format != Format::Qcow2 && !(plain.is_empty() && enc.is_empty()) {
        // Refused before any progress, as qemu does for drivers without amend.
        bail!(
            "Format driver '{}' does not support option amendment",
            img.format.name()
        );
    }
    // Options qemu's qcow2 driver cannot amend fail in its option parsing, before any
    // progress: let the format refuse them alone (nothing is changed).
    let mut unknown = OptionList::new();
    for (k, v) in plain.entries() {
        if !AMENDABLE.contains(&k.as_str()) {
            unknown.set(k, v);
        }
    }
    if !unknown.is_empty() {
        diskimg::maint::amend(&img, &unknown)?;
    }
    bar.print(0.0, 0);
    // As qemu: 100% is reported whether or not the change worked.
    let amended = apply(&img, &plain, &mut enc);
    bar.print(100.0, 0);
    amended?;
    img.close()?;
    bar.end();
    Ok(0)
}

/// Applies the format options, then the key-slot options.
fn apply(img: &diskimg::Image, plain: &OptionList, enc: &mut OptionList) -> Result<()> {
    if !plain.is_empty() {
        diskimg::maint::amend(img, plain)?;
    }
    if !enc.is_empty() {
        let dev = img
            .device
            .as_any()
            .downcast_ref::<Qcow2Device>()
            .ok_or_else(|| anyhow!("not a qcow2 device"))?;
        dev.amend_encryption(enc, &crate::secrets::secrets())?;
        if let Some((k, _)) = enc.entries().first() {
            bail!("Invalid parameter '{k}'");
        }
    }
    Ok(())
}
