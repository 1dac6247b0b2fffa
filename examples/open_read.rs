//! Usage: `cargo run --example open_read -- IMAGE [OFFSET]`
//!
//! Opens any supported image (format probed, backing chain followed as qemu does),
//! prints what `info` knows and dumps 64 bytes at OFFSET (default 0).

use diskimg::{ImageOptions, OpenPolicy, open};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: open_read IMAGE [OFFSET]")?;
    let offset: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);

    let opts = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
    let img = open(&path, None, &opts)?;
    let info = img.device.info();
    println!("image:        {path}");
    println!("format:       {}", info.format);
    println!("virtual size: {} bytes", info.virtual_size);
    if let Some(c) = info.cluster_size {
        println!("cluster size: {c}");
    }
    for layer in img.chain().iter().skip(1) {
        println!("backing:      {} ({})", layer.path.display(), layer.format);
    }

    let len = 64u64.min(info.virtual_size.saturating_sub(offset));
    let mut buf = vec![0u8; usize::try_from(len)?];
    img.device.read_at(&mut buf, offset)?;
    for (i, line) in buf.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        println!("{:08x}: {}", offset + i as u64 * 16, hex.join(" "));
    }
    Ok(())
}
