//! `measure [--output=human|json] [-O FMT] [-o OPTS] [--size N | [-f FMT] [-l SNAP] FILE]`:
//! the file size a new image would need (raw and qcow2 targets, as qemu).

use anyhow::{Result, anyhow, bail};
use diskimg::OptionList;
use serde_json::{Map, Value, json};

use crate::args::OutputArg;
use crate::common::{open_image, opt_format, out, parse_format, parse_size};
use crate::json::pretty;

/// Arguments of `measure`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    output: OutputArg,
    /// Target format (default raw).
    #[arg(short = 'O', default_value = "raw")]
    target_format: String,
    /// Target creation options.
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Measure an empty image of this size.
    #[arg(long = "size")]
    size: Option<String>,
    /// Source image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Source internal snapshot (`snapshot.id=…`, `snapshot.name=…` or `ID_OR_NAME`).
    #[arg(short = 'l')]
    snapshot: Option<String>,
    /// Open the source read-only shared (accepted).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The source image.
    file: Option<String>,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    crate::common::set_force_share(a.force_share);
    let json = a.output.json()?;
    let target = parse_format(&a.target_format)?;
    let mut opts = OptionList::new();
    for o in &a.options {
        opts.extend_from(o).map_err(|e| anyhow!("{e}"))?;
    }
    let m = match (&a.size, &a.file) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        (Some(s), None) => diskimg::maint::measure(None, parse_size(s)?, target, &opts)?,
        (None, Some(f)) => {
            let format = opt_format(a.format.as_deref(), f)?;
            let img = open_image(f, format, true, true)?;
            let dev = match &a.snapshot {
                Some(l) => {
                    let sel = diskimg::SnapshotSelector::parse(l)?;
                    diskimg::snapshot_device(&img, &sel)?
                }
                None => img.device.clone(),
            };
            diskimg::maint::measure(Some(dev.as_ref()), 0, target, &opts)?
        }
    };
    if json {
        let mut v = Map::new();
        if let Some(b) = m.bitmaps {
            v.insert("bitmaps".into(), json!(b));
        }
        v.insert("required".into(), json!(m.required));
        v.insert("fully-allocated".into(), json!(m.fully_allocated));
        out(&format!("{}\n", pretty(&Value::Object(v))))?;
    } else {
        let mut s = format!(
            "required size: {}\nfully allocated size: {}\n",
            m.required, m.fully_allocated
        );
        if let Some(b) = m.bitmaps {
            s.push_str(&format!("bitmaps size: {b}\n"));
        }
        out(&s)?;
    }
    Ok(0)
}
