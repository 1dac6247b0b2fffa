//! Usage: `cargo run --release --example demo`
//!
//! Makes a 64 MiB raw image with some data and holes in a temporary directory, converts it
//! with diskimg-convert into every format diskimg writes (qcow2 also compressed), reads each
//! result back through the library and, if `qemu-img` is on PATH, asks `qemu-img compare`
//! and `qemu-img check` for a second opinion.

use std::process::Command;

use diskimg::{Format, ImageOptions, OptionList, create, map_chain, open};
use diskimg_convert::{ConvertOptions, convert};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let src_path = dir.path().join("demo.raw");
    let (size, opts) = (64 << 20, ImageOptions::default());
    create(&src_path, Format::Raw, Some(size), OptionList::new(), &opts)?;
    let src = open(&src_path, Some(Format::Raw), &opts)?;
    src.device.write_at(&[0x55; 512], 0)?; // a "boot sector"
    src.device.write_at(&vec![0xab; 1 << 20], 8 << 20)?; // 1 MiB of data
    src.device
        .write_at(b"hello from diskimg", (40 << 20) + 123)?;
    src.device.write_at(&vec![0; 2 << 20], 20 << 20)?; // zeroes written as data
    src.device.flush()?;
    let extents = map_chain(src.device.as_ref(), 0, size)?;
    println!(
        "created {}: 64 MiB, {} extents",
        src_path.display(),
        extents.len()
    );

    let targets = [
        (Format::Qcow2, "", false),
        (Format::Qcow2, "compression_type=zstd", true),
        (Format::Vmdk, "subformat=streamOptimized", true),
        (Format::Vdi, "", false),
        (Format::Vhdx, "", false),
        (Format::Vpc, "subformat=fixed,force_size=on", false),
    ];
    for (i, (fmt, o, compress)) in targets.into_iter().enumerate() {
        let path = dir.path().join(format!("copy{i}.{fmt}"));
        create(&path, fmt, Some(size), OptionList::parse(o)?, &opts)?;
        let dst = open(&path, Some(fmt), &opts)?;
        let copts = ConvertOptions {
            target_is_zero: true,
            compress,
            workers: 2,
            ..Default::default()
        };
        let stats = convert(
            src.device.as_ref(),
            dst.device.as_ref(),
            &copts,
            &mut |_, _| {},
        )?;
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        for off in (0..size).step_by(1 << 20) {
            src.device.read_at(&mut a, off)?;
            dst.device.read_at(&mut b, off)?;
            if a != b {
                return Err(format!("{fmt} copy differs in the MiB at {off}").into());
            }
        }
        drop(dst);
        let file_len = std::fs::metadata(&path)?.len();
        println!(
            "{:>5} {o:<30} {:>8} data bytes{}, file {file_len} bytes: reads back identical",
            fmt.name(),
            stats.data_bytes + stats.compressed_bytes,
            if compress { " (compressed)" } else { "" },
        );
        qemu_second_opinion(&src_path, &path, fmt)?;
    }
    Ok(())
}

fn qemu_second_opinion(
    src: &std::path::Path,
    dst: &std::path::Path,
    fmt: Format,
) -> Result<(), Box<dyn std::error::Error>> {
    let Ok(out) = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", fmt.name()])
        .args([src, dst])
        .output()
    else {
        println!("      qemu-img not found on PATH; skipped its comparison");
        return Ok(());
    };
    if !out.status.success() {
        return Err(format!("qemu-img compare: {}", String::from_utf8_lossy(&out.stdout)).into());
    }
    let check = Command::new("qemu-img")
        .args(["check", "-q", "-f", fmt.name()])
        .arg(dst)
        .output()?;
    // qemu-img has no check for vpc and raw (exit 63): say so rather than claim "clean".
    let verdict = match check.status.code() {
        Some(0) => "clean",
        Some(63) => "not checkable by qemu-img",
        _ => return Err(format!("qemu-img check failed on the {fmt} copy").into()),
    };
    println!("      qemu-img compare: identical; qemu-img check: {verdict}");
    Ok(())
}
