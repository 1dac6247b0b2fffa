//! Usage: `cargo run --example convert -- SRC DST [FORMAT]`
//!
//! Converts any supported image into a new image of FORMAT (default raw), sparse and
//! with two reader threads, printing progress — the core of `diskimg convert`.

use std::io::Write;

use diskimg::{Format, ImageOptions, OpenPolicy, OptionList, create, open};
use diskimg_convert::{ConvertOptions, convert};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src_path, dst_path, rest @ ..] = args.as_slice() else {
        return Err("usage: convert SRC DST [FORMAT]".into());
    };
    let format = Format::from_name(rest.first().map_or("raw", String::as_str))?;

    let ro = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
    let src = open(src_path, None, &ro)?;
    let size = src.device.virtual_size();
    create(
        dst_path,
        format,
        Some(size),
        OptionList::new(),
        &ImageOptions::default(),
    )?;
    let dst = open(dst_path, Some(format), &ImageOptions::default())?;

    let opts = ConvertOptions {
        target_is_zero: true,
        workers: 2,
        ..ConvertOptions::default()
    };
    let stats = convert(
        src.device.as_ref(),
        dst.device.as_ref(),
        &opts,
        &mut |done, total| {
            print!("\r{:>3}%", done * 100 / total.max(1));
            let _ = std::io::stdout().flush();
        },
    )?;
    println!(
        "\n{} -> {} ({}): {} bytes written, {} left sparse",
        src_path,
        dst_path,
        format,
        stats.data_bytes + stats.compressed_bytes,
        stats.skipped_bytes + stats.zeroed_bytes
    );
    Ok(())
}
