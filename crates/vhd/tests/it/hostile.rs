//! Hostile input: truncation / bit-flip sweeps, bad checksums, BAT beyond the file,
//! absurd sizes: clean errors, never a panic.

use std::sync::Arc;

use diskimg_blockio::{CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage};
use diskimg_testutil::{corpus_file, corruption_sweep, tempdir};

fn image(opts: &str, size: u64, writes: &[(u64, usize)]) -> Vec<u8> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut req = CreateRequest::new(size, OptionList::parse(opts).unwrap());
    diskimg_vhd::DRIVER.create(s.clone(), &mut req).unwrap();
    let dev = diskimg_vhd::DRIVER
        .open(s.clone(), &OpenOptions::new())
        .unwrap();
    for &(o, l) in writes {
        dev.write_at(&vec![0x5a; l], o).unwrap();
    }
    let mut v = vec![0u8; s.len().unwrap() as usize];
    s.read_exact_at(&mut v, 0).unwrap();
    v
}

fn open_err(bytes: Vec<u8>) -> String {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    diskimg_vhd::DRIVER
        .open(s, &OpenOptions::new().read_only(true))
        .unwrap_err()
        .to_string()
}

fn fix_footer_checksum(v: &mut [u8], at: usize) {
    v[at + 64..at + 68].fill(0);
    let sum = !v[at..at + 512]
        .iter()
        .fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
    v[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn sweeps_do_not_panic() {
    let dynamic = image("", 4 << 20, &[(0, 4096), (2 << 20, 512)]);
    // Headers, BAT and the first bitmap: flip everything up to the first data sector.
    corruption_sweep(&diskimg_vhd::DRIVER, &dynamic, 509, 2560);
    let fixed = image("subformat=fixed", 64 << 10, &[(0, 512)]);
    corruption_sweep(&diskimg_vhd::DRIVER, &fixed[fixed.len() - 2048..], 97, 2048);
    // A differencing child (parent locator data right after the BAT) with one block.
    let parent = MemStorage::from_vec(image("", 4 << 20, &[]));
    let child: Arc<dyn Storage> = Arc::new(MemStorage::new());
    diskimg_vhd::create_differencing(child.as_ref(), &parent, "dir/parent.vhd").unwrap();
    let dev = diskimg_vhd::DRIVER
        .open(child.clone(), &OpenOptions::new())
        .unwrap();
    dev.write_at(&[1u8; 1000], 3000).unwrap();
    let mut v = vec![0u8; child.len().unwrap() as usize];
    child.read_exact_at(&mut v, 0).unwrap();
    corruption_sweep(&diskimg_vhd::DRIVER, &v, 500, 3072);
    let dir = tempdir();
    for name in [
        "afl5.img",
        "virtualpc-dynamic.vhd",
        "hyperv2012r2-dynamic.vhd",
    ] {
        let p = corpus_file(name, dir.path());
        let v = std::fs::read(&p).unwrap();
        corruption_sweep(&diskimg_vhd::DRIVER, &v[..v.len().min(8192)], 1024, 1536);
    }
}

#[test]
fn specific_errors() {
    let good = image("", 4 << 20, &[(0, 512)]);
    // Bad footer checksum (qemu: "Incorrect header checksum").
    let mut v = good.clone();
    v[70] ^= 1;
    assert!(open_err(v).contains("Incorrect header checksum"));
    // Not a VHD at all.
    assert!(open_err(vec![0u8; 4096]).contains("invalid VPC image"));
    assert!(open_err(vec![0u8; 100]).contains("too small"));
    // BAT beyond the end of the file.
    let mut v = good.clone();
    v[512 + 16..512 + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert!(open_err(v).contains("BAT beyond the end"));
    // A BAT entry pointing past the end (qemu: free_data_block_offset … truncated).
    let mut v = good.clone();
    v[1536..1540].copy_from_slice(&0x0100_0000u32.to_be_bytes());
    assert!(open_err(v).contains("truncated"));
    // Invalid block size (iotest 088).
    let mut v = good.clone();
    v[512 + 32..512 + 36].copy_from_slice(&1000u32.to_be_bytes());
    assert!(open_err(v).contains("Invalid block size 1000"));
    // Page table too small.
    let mut v = good.clone();
    v[512 + 28..512 + 32].copy_from_slice(&1u32.to_be_bytes());
    assert!(open_err(v).contains("Page table too small"));
    // Size beyond 2040 GiB.
    let mut v = good.clone();
    v[48..56].copy_from_slice(&(3u64 << 40).to_be_bytes());
    v[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    fix_footer_checksum(&mut v, 0);
    assert!(open_err(v).contains("2040"));
    // A truncated fixed disk no longer has its footer at the end.
    let f = image("subformat=fixed", 1 << 20, &[]);
    assert!(open_err(f[..f.len() - 1].to_vec()).contains("invalid VPC image"));
}

#[test]
fn read_only_refuses_writes() {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(image("", 1 << 20, &[])));
    let d = diskimg_vhd::DRIVER
        .open(s, &OpenOptions::new().read_only(true))
        .unwrap();
    assert!(d.write_at(&[1], 0).is_err());
    assert!(d.read_at(&mut [0u8; 2], d.virtual_size() - 1).is_err());
}

/// Random multi-byte mutations of headers, BAT and bitmaps; the image is opened
/// read-write, written, zeroed, mapped and checked: errors are fine, panics are not.
#[test]
fn writes_on_mutated_images_do_not_panic() {
    use diskimg_blockio::{RepairMode, ZeroFlags, map_all};
    let dynamic = image("", 4 << 20, &[(0, 4096), (2 << 20, 512)]);
    let parent = MemStorage::from_vec(image("", 4 << 20, &[]));
    let child: Arc<dyn Storage> = Arc::new(MemStorage::new());
    diskimg_vhd::create_differencing(child.as_ref(), &parent, "p.vhd").unwrap();
    diskimg_vhd::DRIVER
        .open(child.clone(), &OpenOptions::new())
        .unwrap()
        .write_at(&[9u8; 700], 1_000_000)
        .unwrap();
    let mut diff = vec![0u8; child.len().unwrap() as usize];
    child.read_exact_at(&mut diff, 0).unwrap();
    let mut seed = 0x9e37_79b9_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..1000 {
        let mut v = if round % 2 == 0 {
            dynamic.clone()
        } else {
            diff.clone()
        };
        let hot = 3584.min(v.len());
        for _ in 0..1 + next() % 4 {
            let i = (next() as usize) % hot;
            v[i] = next() as u8;
        }
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(v));
        let Ok(dev) = diskimg_vhd::DRIVER.open(s, &OpenOptions::new()) else {
            continue;
        };
        let size = dev.virtual_size();
        if size == 0 {
            continue;
        }
        let off = next() % size;
        let len = (next() % 300_000).min(size - off);
        let _ = dev.write_at(&vec![1u8; len as usize], off);
        let _ = dev.write_zeroes(off / 2, len.min(size - off / 2), ZeroFlags::default());
        let _ = map_all(dev.as_ref(), 0, size.min(64 << 20));
        let mut buf = vec![0u8; len as usize];
        let _ = dev.read_at(&mut buf, off);
        let _ = dev.check(RepairMode::All);
    }
}
