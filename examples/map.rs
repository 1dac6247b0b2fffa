//! Usage: `cargo run --example map -- IMAGE`
//!
//! Prints where the guest data of an image lives, through its whole backing chain, in
//! the shape of `qemu-img map --output=json` (one extent per line).

use diskimg::{ImageOptions, OpenPolicy, map_chain, open};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: map IMAGE")?;
    let opts = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
    let img = open(&path, None, &opts)?;
    let size = img.device.virtual_size();
    if size == 0 {
        println!("(empty image)");
        return Ok(());
    }
    let (mut data, mut zero) = (0u64, 0u64);
    for e in map_chain(img.device.as_ref(), 0, size)? {
        let offset = e.offset.map_or_else(|| "-".to_string(), |o| o.to_string());
        println!(
            "start={:<12} length={:<12} depth={} present={} zero={} data={} compressed={} offset={offset}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if e.data {
            data += e.length;
        } else {
            zero += e.length;
        }
    }
    println!("{data} bytes of data, {zero} bytes reading as zeroes");
    Ok(())
}
