//! `checksum [-f FMT] [--algorithm blkhash|sha256|blake3] [-m N] [-p]
//! [--output=human|json] IMAGE`: a digest of the guest content, the same for the same
//! guest bytes in any format and allocation (see `diskimg::checksum`).

use anyhow::{Result, anyhow};
use diskimg::checksum::{Algorithm, Options};
use serde_json::{Map, Value, json};

use crate::args::{FormatArg, ReadOnlyShareArg};
use crate::common::{open_image, out, parse_output};
use crate::json::pretty;
use crate::stream_progress::StreamProgress;

/// Arguments of `checksum`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// `blkhash` (default: blksum's digest, SHA-256 over 64 KiB blocks), `sha256` or
    /// `blake3` (the plain guest bytes, as sha256sum/b3sum of the raw image).
    #[arg(short = 'a', long = "algorithm", default_value = "blkhash")]
    algorithm: String,
    /// Worker threads (1..64; default: the number of CPUs, at most 8).
    #[arg(short = 'm', long = "parallel")]
    workers: Option<usize>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Output format: human (`DIGEST  IMAGE`, as blksum) or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    #[command(flatten)]
    force_share: ReadOnlyShareArg,
    /// The image.
    file: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    a.force_share.apply();
    let json = parse_output(&a.output)?;
    let algorithm = Algorithm::parse(&a.algorithm).ok_or_else(|| {
        anyhow!(
            "Unknown checksum algorithm '{}' (blkhash, sha256 or blake3)",
            a.algorithm
        )
    })?;
    let mut opts = Options {
        algorithm,
        ..Options::default()
    };
    if let Some(n) = a.workers {
        if !(1..=64).contains(&n) {
            anyhow::bail!("Invalid number of workers specified. Must be between 1 and 64.");
        }
        opts.workers = n;
    }
    let format = a.format.of(&a.file)?;
    let bar = StreamProgress::new(a.progress);
    let (img, digest) = match crate::source::open_special(&a.file, format, false)? {
        Some(img) => {
            let d = crate::source::checksum(&a.file, &img, &mut opts, &bar)?;
            (img, d)
        }
        None => {
            let img = open_image(&a.file, format, true, true)?;
            let d = diskimg::checksum::checksum(img.device.as_ref(), &opts, &mut |d, t| {
                bar.update(d, Some(t));
            })
            .map_err(|e| anyhow!("error while reading '{}': {e}", a.file))?;
            (img, d)
        }
    };
    bar.end();
    if json {
        let mut v = Map::new();
        v.insert("filename".into(), json!(a.file));
        v.insert("format".into(), json!(img.format.name()));
        let size = crate::source::guest_len(&a.file).unwrap_or(img.device.virtual_size());
        v.insert("virtual-size".into(), json!(size));
        v.insert("algorithm".into(), json!(algorithm.name()));
        if algorithm == Algorithm::Blkhash {
            v.insert("block-size".into(), json!(diskimg::checksum::BLOCK_SIZE));
        }
        v.insert("checksum".into(), json!(digest.hex()));
        out(&format!("{}\n", pretty(&Value::Object(v))))?;
    } else {
        out(&format!("{}  {}\n", digest.hex(), a.file))?;
    }
    Ok(0)
}
