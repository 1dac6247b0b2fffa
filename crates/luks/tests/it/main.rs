#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! The standalone luks format: qemu reads what we write and the reverse, a random-write
//! model (with reopening), crash consistency at every storage operation, hostile headers.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CrashMode, CreateRequest, Driver, FaultStorage, MemStorage, OpenOptions,
    OptionList, Secrets, Storage,
};
use diskimg_luks::DRIVER;
use diskimg_testutil::{read_all, tempdir};
use proptest::prelude::*;

const PASS: &str = "luks-test-passphrase";

fn secrets() -> Secrets {
    let mut s = Secrets::new();
    s.insert("sec0", PASS.as_bytes().to_vec());
    s
}

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions::new()
        .read_only(read_only)
        .secrets(secrets())
        .driver_option("key-secret", "sec0")
}

fn create(size: u64, extra: &str) -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let o = OptionList::parse(&format!("key-secret=sec0,iter-time=10{extra}")).unwrap();
    let mut req = CreateRequest::new(size, o).secrets(secrets());
    let st: Arc<dyn Storage> = s.clone();
    DRIVER.create(st, &mut req).unwrap();
    assert!(req.options.is_empty(), "{:?}", req.options);
    s.to_vec()
}

fn open_bytes(bytes: Vec<u8>, read_only: bool) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    DRIVER.open(s, &opts(read_only)).unwrap()
}

fn qemu_io(path: &Path, cmd: &str) -> String {
    let out = Command::new("qemu-io")
        .args([
            "--object",
            &format!("secret,id=sec0,data={PASS}"),
            "--image-opts",
            "-c",
            cmd,
            &format!(
                "driver=luks,file.filename={},key-secret=sec0",
                path.display()
            ),
        ])
        .output()
        .expect("run qemu-io (install qemu-utils)");
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !so.contains("failed") && !so.contains("Pattern"),
        "qemu-io {cmd}: {so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

#[test]
fn qemu_reads_ours_and_we_read_qemus() {
    let dir = tempdir();
    for extra in [
        "",
        ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
    ] {
        let ours = dir.path().join("ours.luks");
        std::fs::write(&ours, create(4 << 20, extra)).unwrap();
        let s: Arc<dyn Storage> =
            Arc::new(diskimg_blockio::FileStorage::open(&ours, false).unwrap());
        let dev = DRIVER.open(s, &opts(false)).unwrap();
        dev.write_at(&[0x5a; 65536], 0).unwrap();
        dev.write_at(&[0x6b; 1000], 70_000).unwrap();
        dev.flush().unwrap();
        drop(dev);
        qemu_io(&ours, "read -P 0x5a 0 64k");
        qemu_io(&ours, "read -P 0x6b 70000 1000");
        // qemu writes; we read.
        let theirs = dir.path().join("theirs.luks");
        let out = Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                &format!("secret,id=sec0,data={PASS}"),
                "-o",
                &format!("key-secret=sec0,iter-time=10{extra}"),
                theirs.to_str().unwrap(),
                "4M",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        qemu_io(&theirs, "write -P 0x33 4095 8193");
        let dev = open_bytes(std::fs::read(&theirs).unwrap(), true);
        assert_eq!(dev.virtual_size(), 4 << 20);
        let mut b = vec![0u8; 8193];
        dev.read_at(&mut b, 4095).unwrap();
        assert!(b.iter().all(|&x| x == 0x33));
        assert!(dev.info().encrypted);
    }
}

#[test]
fn wrong_or_missing_key_and_metadata_only() {
    let img = create(1 << 20, "");
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img.clone()));
    let e = DRIVER.open(s.clone(), &OpenOptions::new()).unwrap_err();
    assert!(
        e.to_string().contains("Parameter 'key-secret' is required"),
        "{e}"
    );
    let mut bad = Secrets::new();
    bad.insert("sec0", b"wrong".to_vec());
    let e = DRIVER
        .open(
            s.clone(),
            &OpenOptions::new()
                .secrets(bad)
                .driver_option("key-secret", "sec0"),
        )
        .unwrap_err();
    assert!(e.to_string().contains("Invalid password"), "{e}");
    let dev = DRIVER
        .open(
            s,
            &OpenOptions::new()
                .read_only(true)
                .driver_option("encrypt.no-io", "on"),
        )
        .unwrap();
    assert_eq!(dev.virtual_size(), 1 << 20);
    assert!(dev.read_at(&mut [0u8; 512], 0).is_err());
    let ro = open_bytes(img, true);
    assert!(ro.write_at(&[1], 0).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Random unaligned writes agree with a byte-vector model, also after reopening.
    #[test]
    fn random_writes_match_a_model(ops in proptest::collection::vec((0u64..(256 << 10), 1usize..5000, any::<u8>()), 1..24)) {
        let size = 256u64 << 10;
        let img = create(size, "");
        let s = Arc::new(MemStorage::from_vec(img));
        let st: Arc<dyn Storage> = s.clone();
        let dev = DRIVER.open(st, &opts(false)).unwrap();
        // A fresh payload decrypts to noise, as in qemu: the model starts from it.
        let mut model = read_all(dev.as_ref());
        for (off, len, pat) in ops {
            let len = len.min((size - off) as usize);
            dev.write_at(&vec![pat; len], off).unwrap();
            model[off as usize..off as usize + len].fill(pat);
        }
        prop_assert_eq!(&read_all(dev.as_ref()), &model);
        dev.flush().unwrap();
        drop(dev);
        let again = open_bytes(s.to_vec(), true);
        prop_assert_eq!(&read_all(again.as_ref()), &model);
    }
}

#[test]
fn crash_at_every_operation() {
    let size = 1u64 << 20;
    let base = create(size, "");
    let initial = read_all(open_bytes(base.clone(), true).as_ref());
    let work: Vec<(u64, usize, u8)> = vec![
        (100, 5000, 1),
        (512 << 10, 64 << 10, 2),
        (0, 0, 0), // flush
        (1000, 20, 3),
        (700_000, 300, 4),
        (0, 0, 0),
        (300, 100, 5),
    ];
    let run = |fs: Arc<FaultStorage>| -> (Vec<u8>, Vec<bool>) {
        let mut model = initial.clone();
        let mut durable = model.clone();
        let mut touched = vec![false; size as usize];
        let st: Arc<dyn Storage> = fs;
        let Ok(dev) = DRIVER.open(st, &opts(false)) else {
            return (durable, touched);
        };
        for &(off, len, pat) in &work {
            let r = if len == 0 {
                let r = dev.flush();
                if r.is_ok() {
                    durable = model.clone();
                    touched.fill(false);
                }
                r
            } else {
                // A sector partly written is rewritten whole (read-modify-write).
                let (a, b) = (off - off % 512, (off + len as u64).next_multiple_of(512));
                touched[a as usize..b as usize].fill(true);
                model[off as usize..off as usize + len].fill(pat);
                dev.write_at(&vec![pat; len], off)
            };
            if r.is_err() {
                break;
            }
        }
        (durable, touched)
    };
    let counter = Arc::new(FaultStorage::new(base.clone(), None));
    run(counter.clone());
    let total = counter.ops();
    assert!(total >= 7, "{total}");
    for cut in 0..=total {
        for mode in [
            CrashMode::KeepAll,
            CrashMode::DropUnflushed,
            CrashMode::Random(cut + 7),
        ] {
            let fs = Arc::new(FaultStorage::new(base.clone(), Some(cut)));
            let (durable, touched) = run(fs.clone());
            let dev = open_bytes(fs.crash_image(mode), true);
            let got = read_all(dev.as_ref());
            for (i, (&g, &d)) in got.iter().zip(durable.iter()).enumerate() {
                assert!(
                    g == d || touched[i],
                    "cut {cut} {mode:?}: byte {i} is {g}, flushed {d}"
                );
            }
        }
    }
}

#[test]
fn hostile_headers_never_panic() {
    let img = create(64 << 10, "");
    diskimg_testutil::corruption_sweep(&DRIVER, &img[..8192.min(img.len())], 512, 600);
    assert!(!diskimg_testutil::exercise_driver(&DRIVER, &[]));
}
