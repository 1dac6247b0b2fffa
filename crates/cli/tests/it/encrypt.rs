//! Encrypted qcow2 through the CLI: `--object secret`, `--image-opts`, `-o encrypt.*`,
//! side by side with qemu-img / qemu-io.

use std::path::Path;
use std::process::Command;

use diskimg_testutil::{pattern, tempdir};

use crate::{code, diskimg, diskimg_ok, s};

const OBJ: &str = "secret,id=sec0,data=cli-secret";
const BAD: &str = "secret,id=sec0,data=not-it";

fn iopts(p: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        s(p)
    )
}

/// Runs a qemu tool with the secret; asserts success; returns stdout.
fn q(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !so.contains("failed"),
        "{tool} {args:?}: {so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// `qemu-io` (`qemu = true`) or our `io` running `cmds` on the encrypted image `io`
/// (image-opts) with the secret; asserts success.
fn io_cmds(qemu: bool, io: &str, cmds: &[&str]) {
    let mut a = vec!["--object", OBJ, "--image-opts"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(io);
    if qemu {
        q("qemu-io", &a);
    } else {
        a.insert(0, "io");
        diskimg_ok(&a);
    }
}

/// `qemu-img check` of the encrypted image `io` finds no errors; returns its report.
fn qemu_check_clean(io: &str) -> String {
    let chk = q("qemu-img", &["check", "--object", OBJ, "--image-opts", io]);
    assert!(chk.contains("No errors were found"), "{chk}");
    chk
}

fn qemu_luks(p: &Path, opts: &str, size: &str, writes: &[&str]) {
    q(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "qcow2",
            "-o",
            &format!("encrypt.key-secret=sec0,{opts}"),
            s(p),
            size,
        ],
    );
    io_cmds(true, &iopts(p), writes);
}

/// The guest content as qemu decrypts it (image-opts string `io`).
fn qemu_content(dir: &Path, io: &str) -> Vec<u8> {
    let out = dir.join("qemu-out.raw");
    q(
        "qemu-img",
        &[
            "convert",
            "--object",
            OBJ,
            "--image-opts",
            io,
            "-O",
            "raw",
            s(&out),
        ],
    );
    std::fs::read(out).unwrap()
}

fn ours_content(dir: &Path, io: &str) -> Vec<u8> {
    let out = dir.join("ours-out.raw");
    diskimg_ok(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        io,
        "-O",
        "raw",
        s(&out),
    ]);
    std::fs::read(out).unwrap()
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 70000 5000",
    "write -z 1M 64k",
    "write -P 0x33 2047k 1k",
];

#[test]
fn qemu_encrypted_images_read_through_the_cli() {
    let dir = tempdir();
    for (i, opts) in [
        "encrypt.format=luks,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.iter-time=10,cluster_size=4k,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        "encrypt.format=aes,cluster_size=16k",
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("q{i}.qcow2"));
        qemu_luks(&p, opts, "2M", WRITES);
        let io = iopts(&p);
        assert!(ours_content(dir.path(), &io) == qemu_content(dir.path(), &io), "{opts}");
        io_cmds(false, &io, &["read -P 0x11 0 64k", "read -P 0 1M 64k"]);
        // info without a key, as qemu-img info.
        assert_eq!(
            diskimg_ok(&["info", "--output=json", s(&p)]).replace(' ', ""),
            q("qemu-img", &["info", "--output=json", s(&p)]).replace(' ', ""),
            "{opts}"
        );
        for extra in [&[][..], &["--output=json"][..]] {
            let mut a = vec!["map", "--object", OBJ, "--image-opts"];
            a.extend(extra);
            a.push(&io);
            // Human map fails on encrypted data, as in qemu; JSON works.
            let ours = diskimg(&a);
            let theirs = Command::new("qemu-img").args(&a).output().unwrap();
            assert_eq!(ours.stdout, theirs.stdout, "{opts} map {extra:?}");
            assert_eq!(code(&ours), theirs.status.code().unwrap(), "{opts} map");
            let mut c = vec!["check", "--object", OBJ, "--image-opts"];
            c.extend(extra);
            c.push(&io);
            assert_eq!(diskimg_ok(&c), q("qemu-img", &c), "{opts} check {extra:?}");
        }
        let raw = dir.path().join("expect.raw");
        std::fs::write(&raw, qemu_content(dir.path(), &io)).unwrap();
        let r = format!("driver=raw,file.filename={}", s(&raw));
        let o = diskimg_ok(&["compare", "--object", OBJ, "--image-opts", &io, &r]);
        assert_eq!(o, "Images are identical.\n");
    }
}

#[test]
fn create_and_convert_encrypted_open_in_qemu() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let mut data = pattern(7, 3 << 20);
    let marker = b"CLI-PLAINTEXT-MARKER-0123456789";
    for c in data.chunks_mut(4096) {
        c[..marker.len()].copy_from_slice(marker);
    }
    data[(1 << 20)..(2 << 20)].fill(0);
    std::fs::write(&src, &data).unwrap();
    for o in [
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,cluster_size=4k",
        "encrypt.format=aes,encrypt.key-secret=sec0",
    ] {
        let dst = dir.path().join("dst.qcow2");
        diskimg_ok(&[
            "convert",
            "--object",
            OBJ,
            "-O",
            "qcow2",
            "-o",
            o,
            s(&src),
            s(&dst),
        ]);
        let io = iopts(&dst);
        let r = format!("driver=raw,file.filename={}", s(&src));
        q(
            "qemu-img",
            &["compare", "--object", OBJ, "--image-opts", &io, &r],
        );
        qemu_check_clean(&io);
        let file = std::fs::read(&dst).unwrap();
        assert!(
            !file.windows(marker.len()).any(|w| w == marker),
            "{o}: plaintext"
        );
        // create, then qemu-io and our io write the same pattern.
        let c = dir.path().join("new.qcow2");
        diskimg_ok(&[
            "create",
            "-q",
            "--object",
            OBJ,
            "-f",
            "qcow2",
            "-o",
            o,
            s(&c),
            "1M",
        ]);
        let io = iopts(&c);
        io_cmds(false, &io, &["write -P 0x42 1000 10000"]);
        io_cmds(true, &io, &["read -P 0x42 1000 10000", "read -P 0 0 1000"]);
        qemu_check_clean(&io);
    }
}

#[test]
fn wrong_passphrase_exits_1_and_writes_nothing() {
    let dir = tempdir();
    let p = dir.path().join("e.qcow2");
    qemu_luks(
        &p,
        "encrypt.format=luks,encrypt.iter-time=10",
        "1M",
        &["write -P 5 0 4k"],
    );
    let before = std::fs::read(&p).unwrap();
    let io = iopts(&p);
    let out = dir.path().join("out.raw");
    for args in [
        vec![
            "io",
            "--object",
            BAD,
            "--image-opts",
            "-c",
            "write -P 1 0 4k",
            &io,
        ],
        vec![
            "convert",
            "--object",
            BAD,
            "--image-opts",
            &io,
            "-O",
            "raw",
            s(&out),
        ],
        vec!["check", "-r", "all", "--object", BAD, "--image-opts", &io],
    ] {
        let o = diskimg(&args);
        assert_eq!(code(&o), 1, "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("Invalid password, cannot unlock any keyslot"),
            "{err}"
        );
        assert!(!err.contains("not-it"), "secret in the message: {err}");
    }
    assert!(!out.exists(), "convert created its target");
    // No key at all: qemu's message.
    let o = diskimg(&["io", "-c", "read 0 512", s(&p)]);
    assert_eq!(code(&o), 1);
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("Parameter 'encrypt.key-secret' is required for cipher")
    );
    assert!(std::fs::read(&p).unwrap() == before, "image changed");
    // The right secret from a file.
    let f = dir.path().join("pass");
    std::fs::write(&f, "cli-secret").unwrap();
    let obj = format!("secret,id=sec0,file={}", s(&f));
    diskimg_ok(&[
        "io",
        "--object",
        &obj,
        "--image-opts",
        "-c",
        "read -P 5 0 4k",
        &io,
    ]);
}

#[test]
fn backing_chains_with_encryption() {
    let dir = tempdir();
    // Encrypted base, plain overlay: the base's key goes through backing.encrypt.key-secret.
    let base = dir.path().join("base.qcow2");
    qemu_luks(
        &base,
        "encrypt.format=luks,encrypt.iter-time=10",
        "2M",
        &["write -P 0x61 0 1M"],
    );
    let top = dir.path().join("top.qcow2");
    q(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
            "2M",
        ],
    );
    let io = format!(
        "driver=qcow2,file.filename={},backing.encrypt.key-secret=sec0",
        s(&top)
    );
    io_cmds(false, &io, &["write -P 0x62 4096 1000"]);
    assert!(ours_content(dir.path(), &io) == qemu_content(dir.path(), &io));
    let o = diskimg(&["io", "-c", "read 0 512", s(&top)]);
    assert_eq!(code(&o), 1, "the encrypted backing needs its key");
    // info --backing-chain needs no key, as qemu-img info (file lengths aside: qemu rounds
    // them to sectors).
    let strip = |t: String| -> String {
        t.lines()
            .filter(|l| !l.contains("file length"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        strip(diskimg_ok(&["info", "--backing-chain", s(&top)])),
        strip(q("qemu-img", &["info", "--backing-chain", s(&top)]))
    );
    // Plain base, encrypted overlay: copy-on-write of partial clusters is encrypted.
    let pbase = dir.path().join("pbase.raw");
    std::fs::write(&pbase, pattern(3, 2 << 20)).unwrap();
    let etop = dir.path().join("etop.qcow2");
    diskimg_ok(&[
        "create",
        "-q",
        "--object",
        OBJ,
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "-b",
        s(&pbase),
        "-F",
        "raw",
        s(&etop),
    ]);
    let io = iopts(&etop);
    io_cmds(
        false,
        &io,
        &["write -P 0x63 70000 3000", "write -z 200k 64k"],
    );
    assert!(ours_content(dir.path(), &io) == qemu_content(dir.path(), &io));
    qemu_check_clean(&io);
}

/// qemu-iotests 284: checking (and repairing) encrypted images keeps them intact.
#[test]
fn check_repair_on_encrypted_images() {
    let dir = tempdir();
    let p = dir.path().join("c.qcow2");
    qemu_luks(
        &p,
        "encrypt.format=luks,encrypt.iter-time=10,cluster_size=512",
        "1M",
        &["write -P 0x71 0 100k"],
    );
    let io = iopts(&p);
    let expect = qemu_content(dir.path(), &io);
    let a = ["check", "-r", "all", "--object", OBJ, "--image-opts", &io];
    let ours = diskimg(&a);
    assert_eq!(code(&ours), 0, "{}", String::from_utf8_lossy(&ours.stderr));
    assert!(qemu_content(dir.path(), &io) == expect);
    let chk = qemu_check_clean(&io);
    assert_eq!(String::from_utf8_lossy(&ours.stdout), chk);
}

#[test]
fn amend_key_slots_like_qemu() {
    let dir = tempdir();
    let p = dir.path().join("a.qcow2");
    qemu_luks(
        &p,
        "encrypt.format=luks,encrypt.iter-time=10",
        "1M",
        &["write -P 9 0 4k"],
    );
    let io = iopts(&p);
    let obj1 = "secret,id=sec1,data=new-pass";
    diskimg_ok(&[
        "amend",
        "--object",
        OBJ,
        "--object",
        obj1,
        "--image-opts",
        "-o",
        "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
        &io,
    ]);
    let io1 = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec1",
        s(&p)
    );
    q(
        "qemu-io",
        &[
            "--object",
            obj1,
            "--image-opts",
            "-c",
            "read -P 9 0 4k",
            &io1,
        ],
    );
    // The same refusals, worded as qemu-img's.
    for o in [
        "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=0",
        "encrypt.state=inactive,encrypt.keyslot=4",
        "encrypt.state=active",
        "encrypt.state=inactive,encrypt.new-secret=sec1",
    ] {
        let a = [
            "amend",
            "--object",
            OBJ,
            "--object",
            obj1,
            "--image-opts",
            "-o",
            o,
            &io,
        ];
        let ours = diskimg(&a);
        let theirs = Command::new("qemu-img").args(a).output().unwrap();
        assert_eq!(code(&ours), 1, "{o}");
        assert_eq!(theirs.status.code(), Some(1), "{o}");
        let strip =
            |b: &[u8], p: &str| String::from_utf8_lossy(b).trim_start_matches(p).to_string();
        assert_eq!(
            strip(&ours.stderr, "diskimg: "),
            strip(&theirs.stderr, "qemu-img: "),
            "{o}"
        );
    }
}
