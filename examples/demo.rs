//! Usage: `cargo run --release --example demo`
//!
//! Makes a 64 MiB raw image with some data and holes in a temporary directory, converts
//! it with diskimg-convert (4 threads, sparse), verifies the copy byte for byte and, if
//! `qemu-img` is on PATH, asks `qemu-img compare` for a second opinion.

use std::process::Command;

use diskimg::{Format, ImageOptions, OptionList, create, map_chain, open};
use diskimg_convert::{ConvertOptions, convert};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (src_path, dst_path) = (dir.path().join("demo.raw"), dir.path().join("copy.raw"));
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

    create(&dst_path, Format::Raw, Some(size), OptionList::new(), &opts)?;
    let dst = open(&dst_path, Some(Format::Raw), &opts)?;
    let copts = ConvertOptions {
        target_is_zero: true,
        workers: 4,
        ..ConvertOptions::default()
    };
    let (s, d) = (src.device.as_ref(), dst.device.as_ref());
    let stats = convert(s, d, &copts, &mut |_, _| {})?;
    println!(
        "converted to {}: {} bytes data, {} zeroed, {} left sparse",
        dst_path.display(),
        stats.data_bytes,
        stats.zeroed_bytes,
        stats.skipped_bytes
    );

    // Verify with our own reads.
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for off in (0..size).step_by(1 << 20) {
        s.read_at(&mut a, off)?;
        d.read_at(&mut b, off)?;
        if a != b {
            return Err(format!("copy differs in the MiB at offset {off}").into());
        }
    }
    let data: u64 = map_chain(d, 0, size)?
        .iter()
        .filter(|e| e.data)
        .map(|e| e.length)
        .sum();
    println!("verified: identical; the copy has {data} bytes allocated as data");

    let qemu = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .args([&src_path, &dst_path])
        .output();
    match qemu {
        Ok(out) => {
            print!("qemu-img compare: {}", String::from_utf8_lossy(&out.stdout));
            if !out.status.success() {
                return Err("qemu-img compare reports a difference".into());
            }
        }
        Err(_) => println!("qemu-img not found on PATH; skipped its comparison"),
    }
    Ok(())
}
