//! Usage: `cargo run --release --example aio [DIR]`
//!
//! diskimg's async face on io_uring (docs/vmm.md, "Async requests and io_uring"): makes
//! a 64 MiB raw image in DIR (default: a new directory under the system temp dir), opens
//! it on an io_uring of queue depth 16 with `O_DIRECT` (qemu's `-t none`), writes it
//! through the async face, then keeps 16 random 4 KiB reads in flight on one thread
//! (driven by `pollster::block_on`, no runtime), checks every byte, and prints the rate.
//! Linux only (io_uring).

#[cfg(target_os = "linux")]
fn main() -> diskimg::Result<()> {
    use std::collections::VecDeque;
    use std::time::Instant;

    use diskimg::blockio::{AsyncDevice, CacheMode, IoBuf};
    use diskimg::{Format, ImageOptions, create, open};

    const SIZE: u64 = 64 << 20;
    const DEPTH: usize = 16;
    const READS: u64 = 20_000;

    let dir = match std::env::args_os().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("diskimg-aio-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| diskimg::Error::io("mkdir", e))?;
    let path = dir.join("disk.raw");
    create(
        &path,
        Format::Raw,
        Some(SIZE),
        diskimg::OptionList::new(),
        &ImageOptions::default(),
    )?;
    // One io_uring for every file of the chain; O_DIRECT where the file system allows.
    let opts = ImageOptions::read_only(false)
        .with_cache(CacheMode::None)
        .with_io_uring(DEPTH)?;
    let image = open(&path, Some(Format::Raw), &opts)?;
    let aio = AsyncDevice::new(image.device.clone())?;
    // The byte at offset o is (o / 4096) as u8 ^ (o % 251) as u8.
    let byte = |o: u64| ((o / 4096) ^ (o % 251)).to_le_bytes()[0];
    pollster::block_on(async {
        for chunk in 0..SIZE >> 20 {
            let mut buf = IoBuf::new(1 << 20);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = byte((chunk << 20) + i as u64);
            }
            aio.write_at(buf, chunk << 20).await?;
        }
        aio.flush().await
    })?;
    // DEPTH reads in flight at once from one thread: submit, then await the oldest.
    let t = Instant::now();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut in_flight = VecDeque::new();
    for i in 0..READS + DEPTH as u64 {
        if i < READS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % (SIZE / 4096) * 4096;
            in_flight.push_back((off, aio.read_at(IoBuf::new(4096), off)));
        }
        if in_flight.len() == DEPTH || i >= READS {
            let Some((off, fut)) = in_flight.pop_front() else {
                break;
            };
            let buf = pollster::block_on(fut)?;
            assert!(
                buf.iter()
                    .enumerate()
                    .all(|(k, &b)| b == byte(off + k as u64))
            );
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{READS} random 4 KiB reads at queue depth {DEPTH} (io_uring, O_DIRECT): {:.0} IOPS",
        READS as f64 / secs
    );
    drop(aio);
    image.close()?;
    std::fs::remove_file(&path).map_err(|e| diskimg::Error::io("rm", e))?;
    let _ = std::fs::remove_dir(&dir);
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("this example needs Linux (io_uring)");
}
