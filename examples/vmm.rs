//! Usage: `cargo run --release --example vmm [DIR]`
//!
//! Using diskimg as a VMM's disk engine (docs/vmm.md): makes a raw base image and a qcow2
//! overlay on it in DIR (default: a new directory under the system temp dir), opens the
//! overlay read-write under an explicit policy (backing files relative to the image
//! only), shares the one device between four "queue" threads doing writes, reads,
//! zeroes, discards and flushes, closes it, and checks the result.

use std::path::PathBuf;
use std::sync::Arc;

use diskimg::blockio::ZeroFlags;
use diskimg::{BlockDevice, Format, ImageOptions, OpenPolicy, OptionList, create, open};

const SIZE: u64 = 64 << 20;
const QUEUES: u64 = 4;

/// One virtio queue's worth of requests on the shared device (each queue owns every
/// fourth 4 KiB block).
fn queue(dev: &dyn BlockDevice, q: u64) -> diskimg::Result<()> {
    let block = 4096u64;
    let mut buf = [0u8; 4096];
    let fill = u8::try_from(q + 1).unwrap_or(0xff);
    for i in 0..2048u64 {
        let off = ((i * 7919) % (SIZE / block / QUEUES) * QUEUES + q) * block;
        match i % 16 {
            // A guest write; the device takes `&self`, from any thread.
            0..=9 => dev.write_at(&[fill; 4096], off)?,
            // A read: cached mappings are looked up without excluding other readers.
            10..=12 => dev.read_at(&mut buf, off)?,
            // WRITE ZEROES with the unmap hint (virtio's flag): reads back as zeroes.
            13 => dev.write_zeroes(off, block, ZeroFlags { may_unmap: true })?,
            // DISCARD is a hint: qcow2 drops whole clusters only (as qemu), so this
            // 4 KiB one changes nothing; larger ones read back as zeroes (v3).
            14 => dev.discard(off, block)?,
            // FLUSH: everything written before it is durable when it returns.
            _ => dev.flush()?,
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args().nth(1) {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("diskimg-vmm-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let base = dir.join("base.raw");
    let top = dir.join("disk.qcow2");

    // The policy says which files an image may pull in: the library denies every
    // backing file by default; here, relative names below the image's directory only.
    let opts = ImageOptions::read_only(false).with_policy(OpenPolicy::relative_only());
    create(&base, Format::Raw, Some(SIZE), OptionList::new(), &opts)?;
    std::fs::write(&base, vec![0xbb; usize::try_from(SIZE)?])?;
    let o = OptionList::parse("backing_file=base.raw,backing_fmt=raw")?;
    create(&top, Format::Qcow2, None, o, &opts)?;

    let image = open(&top, Some(Format::Qcow2), &opts)?;
    for layer in image.chain() {
        println!("{} ({})", layer.path.display(), layer.format);
    }
    let dev: Arc<dyn BlockDevice> = image.device.clone();
    let start = std::time::Instant::now();
    std::thread::scope(
        |s| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let threads: Vec<_> = (0..QUEUES)
                .map(|q| {
                    let dev = dev.clone();
                    s.spawn(move || queue(dev.as_ref(), q))
                })
                .collect();
            for t in threads {
                t.join().map_err(|_| "queue thread panicked")??;
            }
            Ok(())
        },
    )
    .map_err(|e| e.to_string())?;
    println!(
        "{} requests on {QUEUES} threads in {:?}",
        QUEUES * 2048,
        start.elapsed()
    );

    // close() flushes and writes what the format keeps until close (qcow2 bitmaps);
    // later writes are refused. Dropping the image closes too, but ignores errors.
    drop(dev);
    image.close()?;

    // Reopen read-only and look at one block of each queue.
    let ro = open(
        &top,
        None,
        &ImageOptions::read_only(true).with_policy(OpenPolicy::relative_only()),
    )?;
    let mut b = [0u8; 1];
    for q in 0..QUEUES {
        ro.device.read_at(&mut b, q * 4096)?;
        println!("queue {q}: first block starts with {:#04x}", b[0]);
    }
    println!("images in {}", dir.display());
    Ok(())
}
