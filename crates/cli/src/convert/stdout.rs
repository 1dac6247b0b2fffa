//! `convert … -`: the target is stdout, written front to back (raw; fixed VHD, the
//! footer last; qcow2 in `qcow2-to-stdout.py`'s layout, which needs a seekable source;
//! stream-optimized VMDK in VMware's layout, the grain directory last).

use std::io::Write;

use anyhow::{Result, anyhow, bail};
use diskimg::{BlockDevice, Format, Image};

use super::Args;
use crate::create::parse_options;
use crate::stream_progress::StreamProgress;

/// Writes `src` to stdout as `out_fmt`.
pub(super) fn run(
    a: &Args,
    src: &dyn BlockDevice,
    images: &[Image],
    out_fmt: Format,
) -> Result<i32> {
    if a.no_create || a.backing.is_some() || a.compress || a.bitmaps || a.copy_range {
        bail!("-n, -B, -c, -C and --bitmaps cannot be used with stdout as the target");
    }
    let mut o = parse_options(&a.options)?;
    let stream = images
        .iter()
        .find_map(|i| crate::source::opened(&i.filename).filter(|o| o.forward.is_some()));
    let name = images
        .first()
        .map(|i| i.filename.clone())
        .unwrap_or_default();
    let end = || crate::source::guest_len(&name).unwrap_or_else(|| src.virtual_size());
    let bar = StreamProgress::new(a.progress.on() && !a.quiet.on());
    let mut out = std::io::BufWriter::with_capacity(4 << 20, std::io::stdout().lock());
    let err = |e: diskimg::Error| anyhow!("error while writing to stdout: {e}");
    match out_fmt {
        Format::Raw => {
            diskimg::stream::write_raw(src, &mut out, &end, &mut |d| bar.update(d, None))
                .map_err(err)?;
            out.flush()?;
        }
        Format::Vpc => {
            if o.take("subformat").is_some_and(|s| s != "fixed") {
                bail!("stdout takes only subformat=fixed for vpc");
            }
            let force = o
                .take_bool("force_size")
                .map_err(|e| anyhow!("{e}"))?
                .unwrap_or(false);
            let azure = o
                .take_bool("azure_align")
                .map_err(|e| anyhow!("{e}"))?
                .unwrap_or(false);
            let n = diskimg::stream::write_raw(src, &mut out, &end, &mut |d| bar.update(d, None))
                .map_err(err)?;
            diskimg::stream::finish_vhd_fixed(&mut out, n, force, azure).map_err(err)?;
        }
        Format::Qcow2 => {
            if let Some(s) = stream {
                bail!(
                    "'{}': qcow2 to stdout reads its source twice (its tables come first): give a seekable source (a file, a URL with range support)",
                    s.name
                );
            }
            let cs = o
                .take_size("cluster_size")
                .map_err(|e| anyhow!("{e}"))?
                .unwrap_or(65536);
            if !cs.is_power_of_two() {
                bail!("Cluster size must be a power of two between 512 and 2048k");
            }
            diskimg::stream::write_qcow2(src, &mut out, cs.trailing_zeros(), &mut |d, t| {
                bar.update(d, Some(t))
            })
            .map_err(err)?;
        }
        Format::Vmdk => {
            if o.take("subformat").is_some_and(|s| s != "streamOptimized") {
                bail!("stdout takes only subformat=streamOptimized for vmdk");
            }
            let profile =
                super::targets::vmdk_profile(&mut o, diskimg::stream::StreamProfile::qemu())?;
            super::targets::refuse_unknown_length(images, "a stream-optimized VMDK")?;
            let threads = super::targets::threads();
            diskimg::stream::write_vmdk(
                src,
                &mut out,
                "disk.vmdk",
                &profile,
                threads,
                &mut |d, t| bar.update(d, Some(t)),
            )
            .map_err(err)?;
        }
        f => bail!(
            "stdout as the target takes raw, qcow2, vpc (fixed) or vmdk (streamOptimized), not {}",
            f.name()
        ),
    }
    if let Some((k, _)) = o.entries().first() {
        bail!("-: Invalid parameter '{k}' for stdout output");
    }
    bar.end();
    Ok(0)
}
