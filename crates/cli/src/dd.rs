//! `dd [-f FMT] [-O FMT] [bs=SIZE] [count=N] [skip=N] if=IN of=OUT`, with qemu-img's
//! semantics: `count` bounds the input *end* (`count*bs` bytes from the start of the
//! input) and `skip` is taken from that, so the output holds `count - skip` blocks
//! (see docs/cli.md).

use anyhow::{Result, anyhow, bail};
use diskimg::{Format, ImageOptions, OpenPolicy, OptionList};

use crate::args::ForceShareArg;
use crate::common::{open_image, opt_format, parse_format, parse_size, round_to_sector};

/// Arguments of `dd`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Input format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output format (default raw).
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    output_format: String,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// Operands: `bs=`, `count=`, `skip=`, `if=`, `of=`.
    operands: Vec<String>,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    a.force_share.apply();
    let (mut bs, mut count, mut skip) = (512u64, None, None);
    let (mut input, mut output) = (None, None);
    for op in &a.operands {
        let Some((k, v)) = op.split_once('=') else {
            bail!("unrecognized operand {op}");
        };
        match k {
            "bs" => {
                bs = parse_size(v).map_err(|_| anyhow!("invalid number: '{v}'"))?;
                if bs == 0 || bs > i32::MAX as u64 {
                    bail!("invalid number: '{v}'");
                }
            }
            "count" => count = Some(parse_size(v).map_err(|_| anyhow!("invalid number: '{v}'"))?),
            "skip" => skip = Some(parse_size(v).map_err(|_| anyhow!("invalid number: '{v}'"))?),
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            _ => bail!("unrecognized operand {k}"),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        bail!("Must specify both input and output files");
    };
    let in_fmt = opt_format(a.format.as_deref(), &input)?;
    let out_fmt: Format = parse_format(&a.output_format)?;
    let src = open_image(&input, in_fmt, true, true)?;
    crate::opening::check_create_name(&output)?;
    let in_size = src.device.virtual_size();
    let mut size = match count {
        Some(c) if c <= in_size / bs => c * bs,
        _ => in_size,
    };
    let in_off = match skip {
        Some(s) => match s.checked_mul(bs) {
            Some(o) if o <= size => o,
            _ => bail!("{input}: cannot skip to specified offset"),
        },
        None => 0,
    };
    size -= in_off;
    let opts = ImageOptions::default()
        .with_policy(OpenPolicy::qemu_compatible())
        .with_secrets(crate::secrets::secrets());
    diskimg::create(
        crate::names::host_path(&output),
        out_fmt,
        Some(round_to_sector(size)?),
        OptionList::new(),
        &opts,
    )
    .map_err(|e| anyhow!("{output}: error while creating output image: {e}"))?;
    crate::common::set_force_share(false);
    let dst = open_image(&output, Some(out_fmt), false, false)?;
    let n = usize::try_from(bs).map_err(|_| anyhow!("block size too large"))?;
    let mut buf = vec![0u8; n.min(usize::try_from(size).unwrap_or(n))];
    let mut pos = 0u64;
    while pos < size {
        let len = bs.min(size - pos);
        let piece = buf
            .get_mut(..usize::try_from(len).unwrap_or(0))
            .unwrap_or_default();
        src.device
            .read_at(piece, in_off + pos)
            .map_err(|e| anyhow!("error while reading from input image file: {e}"))?;
        dst.device
            .write_at(piece, pos)
            .map_err(|e| anyhow!("error while writing to output image file: {e}"))?;
        pos += len;
    }
    dst.close()?;
    Ok(0)
}
