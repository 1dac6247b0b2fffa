//! `amend [--object …] [--image-opts] [-f FMT] [-q] [-p] [--force] -o OPTS FILE`: only
//! LUKS key-slot management (`encrypt.state`, `encrypt.new-secret`, `encrypt.old-secret`,
//! `encrypt.keyslot`, `encrypt.iter-time`) of qcow2 images.

use anyhow::{Result, anyhow, bail};
use diskimg::{Format, OptionList};
use diskimg_qcow2::Qcow2Device;

use crate::common::{open_image, opt_format};

/// Arguments of `amend`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Options to change (may repeat).
    #[arg(short = 'o', required = true)]
    options: Vec<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Progress (accepted).
    #[arg(short = 'p')]
    progress: bool,
    /// Allow dangerous operations (accepted).
    #[arg(long = "force")]
    force: bool,
    /// Cache mode (accepted, ignored).
    #[arg(short = 't')]
    cache: Option<String>,
    /// The image.
    file: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = (a.quiet, a.progress, a.force, &a.cache);
    let mut options = OptionList::new();
    for o in &a.options {
        options.extend_from(o)?;
    }
    let format = opt_format(a.format.as_deref(), &a.file)?;
    let img = open_image(&a.file, format, false, false)?;
    if img.format != Format::Qcow2 {
        bail!(
            "Format driver '{}' does not support option amendment",
            img.format.name()
        );
    }
    if let Some((k, _)) = options
        .entries()
        .iter()
        .find(|(k, _)| !k.starts_with("encrypt."))
    {
        bail!("diskimg amend supports only encrypt.* (LUKS key slot) options, not '{k}'");
    }
    let dev = img
        .device
        .as_any()
        .downcast_ref::<Qcow2Device>()
        .ok_or_else(|| anyhow!("not a qcow2 device"))?;
    dev.amend_encryption(&mut options, &crate::secrets::secrets())?;
    if let Some((k, _)) = options.entries().first() {
        bail!("Invalid parameter '{k}'");
    }
    Ok(0)
}
