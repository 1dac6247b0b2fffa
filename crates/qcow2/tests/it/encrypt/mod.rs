//! Encrypted images (LUKS and legacy AES) against qemu-img / qemu-io with secrets.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, Driver, Error, ExtentKind, FileStorage, OpenOptions, Secrets, Storage, ZeroFlags,
};
use diskimg_qcow2::DRIVER;
use diskimg_testutil::{Model, pattern, read_all, tempdir};

pub(crate) const SECRET: &str = "diskimg-secret";

fn obj() -> String {
    format!("secret,id=sec0,data={SECRET}")
}

fn image_opts(p: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        p.display()
    )
}

/// Runs qemu-img with the secret object; panics unless it succeeds. Returns stdout.
pub(crate) fn qimg(args: &[&str]) -> String {
    let o = obj();
    let mut argv = vec![args[0], "--object", &o];
    argv.extend_from_slice(&args[1..]);
    let out = Command::new("qemu-img").args(&argv).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io commands on an encrypted image.
pub(crate) fn qio(p: &Path, cmds: &[&str]) {
    let o = obj();
    let io = image_opts(p);
    let mut argv = vec!["--object", &o, "--image-opts"];
    for c in cmds {
        argv.push("-c");
        argv.push(c);
    }
    argv.push(&io);
    let out = Command::new("qemu-io").args(&argv).output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !so.contains("failed"),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest bytes as qemu decrypts them.
pub(crate) fn qemu_raw(p: &Path) -> Vec<u8> {
    let dir = tempdir();
    let out = dir.path().join("o.raw");
    qimg(&[
        "convert",
        "--image-opts",
        &image_opts(p),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// `qemu-img check` on an encrypted image: (corruptions, leaks).
pub(crate) fn qemu_check(p: &Path) -> serde_json::Value {
    qemu_check_with(p, SECRET)
}

pub(crate) fn qemu_check_with(p: &Path, pass: &str) -> serde_json::Value {
    let o = format!("secret,id=sec0,data={pass}");
    let io = image_opts(p);
    let out = Command::new("qemu-img")
        .args([
            "check",
            "--object",
            &o,
            "--output=json",
            "--image-opts",
            &io,
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("check: {}", String::from_utf8_lossy(&out.stderr));
    })
}

pub(crate) fn assert_check_clean(p: &Path) {
    let v = qemu_check(p);
    for k in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            v.get(k).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{k}: {v}"
        );
    }
}

pub(crate) fn key_opts(ro: bool, pass: &str) -> OpenOptions {
    OpenOptions::new()
        .read_only(ro)
        .secrets(Secrets::new().with("sec0", pass))
        .driver_option("encrypt.key-secret", "sec0")
}

pub(crate) fn open_enc(p: &Path, ro: bool) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(p, ro).unwrap());
    DRIVER.open(s, &key_opts(ro, SECRET)).unwrap()
}

fn qemu_create(p: &Path, opts: &str, size: &str) {
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("encrypt.key-secret=sec0,{opts}"),
        p.to_str().unwrap(),
        size,
    ]);
}

/// Our map as qemu-img map JSON entries (no offsets for encrypted data).
fn assert_map_like_qemu(dev: &dyn BlockDevice, p: &Path) {
    let q: serde_json::Value = serde_json::from_str(&qimg(&[
        "map",
        "--output=json",
        "--image-opts",
        &image_opts(p),
    ]))
    .unwrap();
    assert_eq!(serde_json::Value::Array(crate::map_json(dev)), q);
}

const QEMU_WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100000 7777",
    "write -P 0x33 1M 300k",
    "write -z 1100k 64k",
    "write -P 0x44 3999k 1k",
];

fn qemu_made_case(opts: &str) {
    let dir = tempdir();
    let p = dir.path().join("q.qcow2");
    qemu_create(&p, opts, "4M");
    qio(&p, QEMU_WRITES);
    let dev = open_enc(&p, true);
    let ours = read_all(dev.as_ref());
    let want = qemu_raw(&p);
    assert!(ours == want, "{opts}: decrypted content differs");
    let vectored = crate::read::read_vectored_all(dev.as_ref());
    assert!(vectored == want, "{opts}: vectored reads differ");
    assert_map_like_qemu(dev.as_ref(), &p);
    assert_eq!(dev.check(Default::default()).unwrap().corruptions, 0);
    assert!(dev.info().encrypted);
}

#[test]
fn qemu_luks_default_64k() {
    qemu_made_case("encrypt.format=luks,encrypt.iter-time=10");
}

#[test]
fn qemu_luks_4k_aes128_sha1() {
    qemu_made_case(
        "encrypt.format=luks,encrypt.iter-time=10,cluster_size=4k,encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
    );
}

#[test]
fn qemu_luks_cbc_essiv_512b_clusters() {
    qemu_made_case(
        "encrypt.format=luks,encrypt.iter-time=10,cluster_size=512,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512",
    );
}

#[test]
fn qemu_luks_extended_l2_cbc_plain() {
    qemu_made_case(
        "encrypt.format=luks,encrypt.iter-time=10,extended_l2=on,cluster_size=32k,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain",
    );
}

#[test]
fn qemu_legacy_aes() {
    qemu_made_case("encrypt.format=aes");
    qemu_made_case("encrypt.format=aes,cluster_size=4k,compat=0.10");
}

#[test]
fn wrong_or_missing_key_is_refused_and_nothing_written() {
    let dir = tempdir();
    let p = dir.path().join("q.qcow2");
    qemu_create(&p, "encrypt.format=luks,encrypt.iter-time=10", "1M");
    qio(&p, &["write -P 7 0 4k"]);
    let before = std::fs::read(&p).unwrap();
    let s = || -> Arc<dyn Storage> { Arc::new(FileStorage::open(&p, false).unwrap()) };
    let e = DRIVER.open(s(), &key_opts(false, "wrong")).unwrap_err();
    assert!(matches!(e, Error::Key(_)), "{e}");
    assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
    let e = DRIVER.open(s(), &OpenOptions::new()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
    let o = OpenOptions::new().driver_option("encrypt.key-secret", "sec9");
    let e = DRIVER.open(s(), &o).unwrap_err();
    assert_eq!(e.to_string(), "No secret with id 'sec9'");
    assert!(!format!("{:?}", key_opts(false, "wrong")).contains("wrong"));
    // Metadata-only open (info): no data I/O.
    let o = OpenOptions::new().driver_option("encrypt.no-io", "on");
    let dev = DRIVER.open(s(), &o).unwrap();
    assert!(dev.info().encrypted);
    assert!(dev.read_at(&mut [0u8; 512], 0).is_err());
    drop(dev);
    assert!(std::fs::read(&p).unwrap() == before, "file changed");
}

#[test]
fn our_writes_on_qemu_luks_read_back_in_qemu() {
    for opts in [
        "encrypt.format=luks,encrypt.iter-time=10,cluster_size=4k",
        "encrypt.format=luks,encrypt.iter-time=10,extended_l2=on,cluster_size=16k,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        "encrypt.format=aes",
    ] {
        let dir = tempdir();
        let p = dir.path().join("q.qcow2");
        qemu_create(&p, opts, "2M");
        qio(&p, &["write -P 0x5c 0 200k"]);
        let mut model = Model::zeroed(2 << 20);
        model.write(0, &[0x5c; 200 << 10]);
        let dev = open_enc(&p, false);
        for (i, (off, len)) in [
            (1000usize, 5000usize),
            (4096, 4096),
            (150_000, 100_000),
            (1_500_001, 77_777),
            (3, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let d = pattern(i as u64 + 1, len);
            dev.write_at(&d, off as u64).unwrap();
            model.write(off, &d);
        }
        dev.write_zeroes(64 << 10, 64 << 10, ZeroFlags::default())
            .unwrap();
        model.zero(64 << 10, 64 << 10);
        dev.write_zeroes(300_000, 1000, ZeroFlags::default())
            .unwrap();
        model.zero(300_000, 1000);
        dev.discard(1 << 20, 256 << 10).unwrap();
        model.zero(1 << 20, 256 << 10);
        assert!(dev.write_compressed(&vec![0u8; 4096], 1 << 20).is_err());
        dev.flush().unwrap();
        assert!(read_all(dev.as_ref()) == model.bytes, "{opts}: our read");
        drop(dev);
        assert!(qemu_raw(&p) == model.bytes, "{opts}: qemu read");
        assert_check_clean(&p);
        let raw = std::fs::read(&p).unwrap();
        let probe = pattern(5, 100_000);
        assert!(
            !raw.windows(64).any(|w| w == &probe[1000..1064]),
            "plaintext in the file"
        );
        let dev = open_enc(&p, true);
        assert!(matches!(
            dev.map(0, 4096).unwrap().kind,
            ExtentKind::Data { offset: None }
        ));
    }
}

#[test]
fn info_encrypt_block_matches_qemu() {
    let dir = tempdir();
    let p = dir.path().join("q.qcow2");
    qemu_create(
        &p,
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.cipher-alg=aes-128",
        "1M",
    );
    let q = diskimg_testutil::qemu_info_json(&p, "qcow2");
    let dev = open_enc(&p, true);
    let info = dev.info();
    let (_, fs) = info.format_specific.unwrap();
    let ours = fs.iter().find(|(k, _)| k == "encrypt").unwrap().1.clone();
    assert_eq!(json(&ours), q["format-specific"]["data"]["encrypt"]);
}

fn json(v: &diskimg_blockio::InfoValue) -> serde_json::Value {
    use diskimg_blockio::InfoValue as I;
    match v {
        I::Bool(b) => (*b).into(),
        I::Int(i) => (*i).into(),
        I::Str(s) => s.clone().into(),
        I::List(l) => serde_json::Value::Array(l.iter().map(json).collect()),
        I::Map(m) => {
            serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), json(v))).collect())
        }
    }
}

pub(crate) fn our_create(p: &Path, size: u64, opts: &str) -> diskimg_blockio::Result<()> {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(p)?);
    let mut req =
        diskimg_blockio::CreateRequest::new(size, diskimg_blockio::OptionList::parse(opts)?)
            .secrets(Secrets::new().with("sec0", SECRET));
    DRIVER.create(s, &mut req)?;
    req.options.clone().finish("qcow2")
}

/// (crypt_method, FDE extension offset/length) of an image file.
fn crypt_layout(p: &Path) -> (u32, Option<(u64, u64)>) {
    use diskimg_blockio::bytes::ReadBytes;
    let b = std::fs::read(p).unwrap();
    let method = b.be_u32(32).unwrap();
    let mut off = if b.be_u32(4).unwrap() >= 3 {
        b.be_u32(100).unwrap() as usize
    } else {
        72
    };
    loop {
        let ty = b.be_u32(off).unwrap();
        let len = b.be_u32(off + 4).unwrap() as usize;
        if ty == 0 {
            return (method, None);
        }
        if ty == 0x0537_be77 {
            return (
                method,
                Some((b.be_u64(off + 8).unwrap(), b.be_u64(off + 16).unwrap())),
            );
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

fn ours_in_qemu_case(opts: &str) {
    let dir = tempdir();
    let p = dir.path().join("ours.qcow2");
    let q = dir.path().join("qemu.qcow2");
    let opts = &if opts.contains("luks") {
        format!("encrypt.iter-time=10,{opts}")
    } else {
        opts.to_string()
    };
    our_create(&p, 3 << 20, &format!("encrypt.key-secret=sec0,{opts}")).unwrap();
    qemu_create(&q, opts, "3M");
    assert_eq!(crypt_layout(&p), crypt_layout(&q), "{opts}: layout");
    // Plaintext with a recognisable marker.
    let marker = b"PLAINTEXT-MARKER-diskimg-0123456789";
    let mut model = Model::zeroed(3 << 20);
    let dev = open_enc(&p, false);
    for (i, (off, len)) in [
        (0usize, 70_000usize),
        (500_000, 1234),
        (1 << 20, 600_000),
        (3_000_000, 145_728),
    ]
    .into_iter()
    .enumerate()
    {
        let mut d = pattern(i as u64 + 10, len);
        for c in d.chunks_mut(512) {
            let n = c.len().min(marker.len());
            c[..n].copy_from_slice(&marker[..n]);
        }
        dev.write_at(&d, off as u64).unwrap();
        model.write(off, &d);
    }
    dev.write_zeroes(1 << 20, 64 << 10, ZeroFlags::default())
        .unwrap();
    model.zero(1 << 20, 64 << 10);
    dev.flush().unwrap();
    assert!(read_all(dev.as_ref()) == model.bytes);
    drop(dev);
    assert!(
        qemu_raw(&p) == model.bytes,
        "{opts}: qemu reads our image differently"
    );
    assert_check_clean(&p);
    let raw = std::fs::read(&p).unwrap();
    assert!(
        !raw.windows(marker.len()).any(|w| w == marker),
        "{opts}: plaintext in the file"
    );
    // qemu-img compare against a plain raw copy of the content.
    let r = dir.path().join("expect.raw");
    std::fs::write(&r, &model.bytes).unwrap();
    let raw_opts = format!("driver=raw,file.filename={}", r.display());
    qimg(&["compare", "--image-opts", &image_opts(&p), &raw_opts]);
    // qemu writes into our image; we read its data.
    qio(&p, &["write -P 0x99 2M 100k"]);
    model.write(2 << 20, &[0x99; 100 << 10]);
    assert!(read_all(open_enc(&p, true).as_ref()) == model.bytes);
}

#[test]
fn ours_luks_default_in_qemu() {
    ours_in_qemu_case("encrypt.format=luks");
}

#[test]
fn ours_luks_variants_in_qemu() {
    ours_in_qemu_case(
        "encrypt.format=luks,cluster_size=4k,encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
    );
    ours_in_qemu_case(
        "encrypt.format=luks,cluster_size=16k,extended_l2=on,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha512",
    );
    ours_in_qemu_case(
        "encrypt.format=luks,cluster_size=512,encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts",
    );
    ours_in_qemu_case(
        "encrypt.format=luks,compat=0.10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain",
    );
}

#[test]
fn ours_legacy_aes_in_qemu() {
    ours_in_qemu_case("encrypt.format=aes");
    let dir = tempdir();
    let p = dir.path().join("a.qcow2");
    our_create(&p, 1 << 20, "encryption=on,encrypt.key-secret=sec0").unwrap();
    assert_eq!(crypt_layout(&p).0, 1);
}

#[test]
fn create_option_errors_as_qemu() {
    let dir = tempdir();
    let p = dir.path().join("e.qcow2");
    let err = |o: &str| our_create(&p, 1 << 20, o).unwrap_err().to_string();
    assert_eq!(
        err("encrypt.format=luks"),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
    assert_eq!(
        err("encryption=on,encrypt.format=luks,encrypt.key-secret=sec0"),
        "'encrypt.format' and its alias 'encryption' can't be used at the same time"
    );
    assert_eq!(
        err("encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128"),
        "Parameter 'encrypt.cipher-alg' is unexpected"
    );
    assert_eq!(
        err(
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1,encrypt.cipher-mode=cbc"
        ),
        "No AES cipher with key size 20 available"
    );
    assert_eq!(
        err("encrypt.format=luks,encrypt.key-secret=nope"),
        "No secret with id 'nope'"
    );
}

/// Preallocated encrypted images (qemu allows them too) read as zeroes: the
/// preallocated clusters hold encrypted zeroes (iotest 188).
#[test]
fn preallocated_encrypted_image_reads_zeroes() {
    let dir = tempdir();
    let p = dir.path().join("p.qcow2");
    let opts = "encrypt.format=luks,encrypt.iter-time=10,encrypt.key-secret=sec0";
    our_create(&p, 1 << 20, &format!("{opts},preallocation=metadata")).unwrap();
    let dev = open_enc(&p, true);
    let mut buf = vec![1u8; 1 << 20];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    qimg(&["check", "--image-opts", &image_opts(&p)]);
}

/// Crash test on an encrypted image: cut at every write and flush; the image opens
/// with its key, checks clean (leaks allowed) and flushed data reads back decrypted.
mod keyslots;
mod robust;

/// LUKS with an external data file: the IV is the offset in the data file.
#[test]
fn luks_with_external_data_file() {
    let dir = tempdir();
    let p = dir.path().join("d.qcow2");
    let data_file = dir.path().join("d.data");
    qemu_create(
        &p,
        &format!(
            "encrypt.format=luks,encrypt.iter-time=10,data_file={}",
            data_file.display()
        ),
        "1M",
    );
    qio(&p, &["write -P 0x5e 4096 10000"]);
    let o = crate::opts(dir.path(), false)
        .secrets(Secrets::new().with("sec0", SECRET))
        .driver_option("encrypt.key-secret", "sec0");
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, false).unwrap());
    let dev = DRIVER.open(s, &o).unwrap();
    assert!(read_all(dev.as_ref()) == qemu_raw(&p));
    dev.write_at(&pattern(4, 5000), 100_000).unwrap();
    let ours = read_all(dev.as_ref());
    drop(dev);
    assert!(qemu_raw(&p) == ours);
    assert_check_clean(&p);
    let data = std::fs::read(&data_file).unwrap();
    assert!(!data.windows(64).any(|w| w == &pattern(4, 5000)[100..164]));
}
