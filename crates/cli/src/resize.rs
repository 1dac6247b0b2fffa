//! `resize [-f FMT] [--shrink] [--preallocation=MODE] [-q] FILE [+|-]SIZE`.

use anyhow::{Result, bail};
use diskimg::blockio::Preallocation;

use crate::args::{FormatArg, QuietArg};
use crate::common::{open_image, out, warn_probed_raw};

/// Arguments of `resize`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// Allow shrinking (data beyond the new end is lost).
    #[arg(long = "shrink")]
    shrink: bool,
    /// Preallocation of the grown area: off, falloc, full (metadata where supported).
    #[arg(long = "preallocation")]
    preallocation: Option<String>,
    #[command(flatten)]
    quiet: QuietArg,
    /// The image.
    file: String,
    /// New size, or `+SIZE`/`-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let format = a.format.of(&a.file)?;
    let prealloc = match &a.preallocation {
        Some(p) => Preallocation::parse(p)?,
        None => Preallocation::Off,
    };
    let (sign, num) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, a.size.get(1..).unwrap_or("")),
        Some(b'-') => (-1, a.size.get(1..).unwrap_or("")),
        _ => (0, a.size.as_str()),
    };
    let n = diskimg::parse_size(num).map_err(|_| {
        anyhow::anyhow!(
            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, \
             G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        )
    })?;
    let img = open_image(&a.file, format, false, true)?;
    warn_probed_raw(&a.file, format, &img);
    let old = img.device.virtual_size();
    let new = match sign {
        1 => old
            .checked_add(n)
            .ok_or_else(|| anyhow::anyhow!("Image size too large"))?,
        -1 => match old.checked_sub(n) {
            Some(v) if v > 0 => v,
            _ => bail!("New image size must be positive"),
        },
        _ => n,
    };
    // qemu-img refuses before anything else: preallocation describes new space.
    if new <= old && prealloc != Preallocation::Off {
        bail!("Preallocation can only be used for growing images");
    }
    if new < old && !a.shrink {
        // As qemu-img: the warning comes with the refusal, after the error line.
        eprintln!(
            "{}: Use the --shrink option to perform a shrink operation.",
            crate::common::prog()
        );
        eprintln!(
            "{}: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
            crate::common::prog()
        );
        return Ok(1);
    }
    img.device.resize(new, prealloc, a.shrink).map_err(|e| {
        if e.is_unsupported() {
            anyhow::anyhow!("Image format driver does not support resize")
        } else {
            anyhow::Error::from(e)
        }
    })?;
    img.close()?;
    if !a.quiet.on() {
        out("Image resized.\n")?;
    }
    Ok(0)
}
