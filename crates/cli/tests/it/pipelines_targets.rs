//! Stream-optimized VMDK to stdout and from pipes, and the `--target` archives (GCP's
//! tar.gz, OVA), judged by qemu-img, GNU tar, gzip, sha256sum and libvmdk (an
//! independent VMDK reader), and read back by diskimg from files and pipes. Failed runs
//! leave no file, and an interrupted stdout stream lacks its end (footer, trailer).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use diskimg_testutil::{assert_qemu_check_clean, qemu_compare, tempdir};

use crate::{qemu_raw, s};

const BIN: &str = env!("CARGO_BIN_EXE_diskimg");

/// Runs a shell pipeline; returns (success, stderr).
fn sh(cmd: &str) -> (bool, String) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn sh_ok(cmd: &str) {
    let (ok, err) = sh(cmd);
    assert!(ok, "{cmd}: {err}");
}

/// A 70 MiB guest: data at both ends, in the middle, a partial grain, holes between.
fn source(dir: &Path) -> PathBuf {
    qemu_raw(
        dir,
        "d.raw",
        "70M",
        &[
            "write -P 0x31 0 100k",
            "write -P 0x32 17M 3M",
            "write -P 0x33 40000k 5k",
            "write -P 0x34 69M 1M",
        ],
    )
}

/// `convert -O vmdk RAW - > OUT`: a stream-optimized VMDK written to stdout.
fn vmdk_to_stdout(raw: &Path, out: &Path) {
    sh_ok(&format!("{BIN} convert -O vmdk {} - > {}", s(raw), s(out)));
}

/// SHA-256 of a VMDK's guest bytes as libvmdk (python3-libvmdk) reads them.
fn libvmdk_sha256(vmdk: &Path) -> String {
    let o = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import sys,hashlib,pyvmdk\nh=pyvmdk.handle();h.open(sys.argv[1]);h.open_extent_data_files()\n\
             n=h.get_media_size();print(hashlib.sha256(h.read_buffer_at_offset(n,0)).hexdigest())",
        )
        .arg(vmdk)
        .output()
        .expect("python3-libvmdk (pyvmdk) is needed: apt install python3-libvmdk");
    assert!(
        o.status.success(),
        "libvmdk could not read {}: {}",
        vmdk.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn sha256(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Checks a stream-optimized VMDK in VMware's layout: header version 3 with the grain
/// directory in the footer, footer and end marker last, qemu-img and libvmdk agree.
fn check_stream_vmdk(vmdk: &Path, raw: &Path) {
    let b = std::fs::read(vmdk).unwrap();
    assert_eq!(&b[..4], b"KDMV");
    assert_eq!(
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
        3,
        "version"
    );
    assert_eq!(u64::from_le_bytes(b[56..64].try_into().unwrap()), u64::MAX);
    let n = b.len();
    assert_eq!(
        u32::from_le_bytes(b[n - 1524..n - 1520].try_into().unwrap()),
        3
    );
    assert_eq!(&b[n - 1024..n - 1020], b"KDMV", "footer header");
    assert!(b[n - 512..].iter().all(|&x| x == 0), "end-of-stream marker");
    assert_qemu_check_clean(vmdk, "vmdk");
    assert!(qemu_compare(raw, "raw", vmdk, "vmdk"));
    assert_eq!(libvmdk_sha256(vmdk), sha256(raw));
}

#[test]
fn stream_optimized_vmdk_out_and_back_through_pipes() {
    let dir = tempdir();
    let raw = source(dir.path());
    let p = |n: &str| dir.path().join(n);
    // On stdout the descriptor names the extent `disk.vmdk` (libvmdk opens it by name).
    vmdk_to_stdout(&raw, &p("disk.vmdk"));
    check_stream_vmdk(&p("disk.vmdk"), &raw);
    std::fs::rename(p("disk.vmdk"), p("s.vmdk")).unwrap();
    let desc =
        String::from_utf8_lossy(&std::fs::read(p("s.vmdk")).unwrap()[512..2048]).into_owned();
    assert!(
        desc.contains("createType=\"streamOptimized\"") && desc.contains("\"ide\""),
        "{desc}"
    );
    // The ESXi profile, into a file.
    sh_ok(&format!(
        "{BIN} convert --target esxi {} {}",
        s(&raw),
        s(&p("e.vmdk"))
    ));
    check_stream_vmdk(&p("e.vmdk"), &raw);
    let desc =
        String::from_utf8_lossy(&std::fs::read(p("e.vmdk")).unwrap()[512..2048]).into_owned();
    for want in [
        "ddb.adapterType = \"lsilogic\"",
        "ddb.virtualHWVersion = \"11\"",
        "ddb.toolsVersion = \"2147483647\"",
        "RW 143360 SPARSE \"e.vmdk\"",
    ] {
        assert!(desc.contains(want), "{want} missing in {desc}");
    }
    // Read back from a pipe (markers walked front to back), ours and qemu's layout.
    let q = p("q.vmdk");
    sh_ok(&format!(
        "qemu-img convert -f raw -O vmdk -o subformat=streamOptimized {} {}",
        s(&raw),
        s(&q)
    ));
    for v in ["s.vmdk", "e.vmdk", "q.vmdk"] {
        sh_ok(&format!(
            "cat {} | {BIN} convert -O qcow2 - {}",
            s(&p(v)),
            s(&p("back.qcow2"))
        ));
        assert!(qemu_compare(&raw, "raw", &p("back.qcow2"), "qcow2"), "{v}");
    }
    let (ok, err) = sh(&format!("cat {} | {BIN} info -", s(&p("s.vmdk"))));
    assert!(ok, "{err}");
}

#[test]
fn truncated_vmdk_streams_fail_and_leave_nothing() {
    let dir = tempdir();
    let raw = source(dir.path());
    let p = |n: &str| dir.path().join(n);
    vmdk_to_stdout(&raw, &p("s.vmdk"));
    let len = std::fs::metadata(p("s.vmdk")).unwrap().len();
    for cut in [100_000, len / 2, len - 1536, len - 100] {
        for target in [
            "-O raw",
            "-O qcow2",
            "--target gcp",
            "--target ova",
            "--target esxi",
        ] {
            let out = p("out");
            let (ok, err) = sh(&format!(
                "head -c {cut} {} | {BIN} convert {target} - {}",
                s(&p("s.vmdk")),
                s(&out)
            ));
            assert!(!ok, "{target} from a stream cut at {cut} succeeded");
            assert!(
                err.contains("'-'") && err.contains("offset"),
                "{target} {cut}: {err}"
            );
            assert!(!out.exists(), "{target} {cut}: a partial target was left");
        }
        // To stdout: the output ends without its footer, which readers refuse.
        let out = p("o.vmdk");
        let (ok, _) = sh(&format!(
            "set -o pipefail; head -c {cut} {} | {BIN} convert -O vmdk - - > {}",
            s(&p("s.vmdk")),
            s(&out)
        ));
        assert!(!ok);
        let (ok, _) = sh(&format!("qemu-img info -f vmdk {} >/dev/null", s(&out)));
        assert!(!ok, "qemu-img opened a stream cut at {cut}");
        let out = p("o.tar.gz");
        let (ok, _) = sh(&format!(
            "head -c {cut} {} | {BIN} convert --target gcp - - > {}",
            s(&p("s.vmdk")),
            s(&out)
        ));
        assert!(!ok);
        assert!(
            !sh(&format!("gzip -t {}", s(&out))).0,
            "gzip accepted a cut archive"
        );
        assert!(!sh(&format!("tar -tzf {} >/dev/null", s(&out))).0);
    }
}

#[test]
fn corrupt_and_wrapped_vmdk_streams() {
    let dir = tempdir();
    let raw = source(dir.path());
    let p = |n: &str| dir.path().join(n);
    vmdk_to_stdout(&raw, &p("s.vmdk"));
    // The Adler-32 ending the first grain's zlib stream (its record starts at sector
    // 128: LBA, size, data).
    let mut b = std::fs::read(p("s.vmdk")).unwrap();
    let size = u32::from_le_bytes(b[65536 + 8..65536 + 12].try_into().unwrap()) as usize;
    b[65536 + 12 + size - 2] ^= 0x55;
    std::fs::write(p("bad.vmdk"), &b).unwrap();
    let out = p("out.qcow2");
    let (ok, err) = sh(&format!(
        "cat {} | {BIN} convert -O qcow2 - {}",
        s(&p("bad.vmdk")),
        s(&out)
    ));
    assert!(
        !ok && err.contains("'-'") && err.contains("offset 65536"),
        "{err}"
    );
    assert!(!out.exists(), "a partial target was left");
    // gzip around the stream: decoded on the fly, its trailer checked at the end.
    sh_ok(&format!(
        "gzip -c {} > {}",
        s(&p("s.vmdk")),
        s(&p("s.vmdk.gz"))
    ));
    sh_ok(&format!(
        "cat {} | {BIN} convert -O raw - {}",
        s(&p("s.vmdk.gz")),
        s(&p("b.raw"))
    ));
    assert_eq!(sha256(&p("b.raw")), sha256(&raw));
    let mut gz = std::fs::read(p("s.vmdk.gz")).unwrap();
    let n = gz.len();
    gz[n - 6] ^= 1; // the CRC-32 in the trailer
    std::fs::write(p("crc.vmdk.gz"), &gz).unwrap();
    let (ok, err) = sh(&format!(
        "cat {} | {BIN} convert -O raw - {}",
        s(&p("crc.vmdk.gz")),
        s(&out)
    ));
    assert!(!ok && err.contains("'-'"), "{err}");
    assert!(!out.exists(), "a partial target was left");
}

#[test]
fn gcp_tar_gz_reads_back_with_gnu_tar() {
    let dir = tempdir();
    let raw = source(dir.path());
    let p = |n: &str| dir.path().join(n);
    sh_ok(&format!(
        "{BIN} convert --target gcp {} {}",
        s(&raw),
        s(&p("a.tar.gz"))
    ));
    sh_ok(&format!(
        "{BIN} convert --target gcp -f raw - - < {} > {}",
        s(&raw),
        s(&p("b.tar.gz"))
    ));
    for a in ["a.tar.gz", "b.tar.gz"] {
        let tgz = p(a);
        sh_ok(&format!("gzip -t {}", s(&tgz)));
        // oldgnu magic, one sparse member named disk.raw.
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("gzip -dc {} | head -c 512", s(&tgz)))
            .output()
            .unwrap();
        assert_eq!(&o.stdout[257..265], b"ustar  \0");
        assert_eq!(&o.stdout[..9], b"disk.raw\0");
        assert_eq!(o.stdout[156], b'S');
        let o = Command::new("tar").arg("-tvzf").arg(&tgz).output().unwrap();
        let list = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && list.lines().count() == 1, "{list}");
        assert!(
            list.contains(" 73400320 ") && list.ends_with("disk.raw\n"),
            "{list}"
        );
        let x = p("x");
        let _ = std::fs::remove_dir_all(&x);
        std::fs::create_dir(&x).unwrap();
        sh_ok(&format!("tar -C {} -xSzf {}", s(&x), s(&tgz)));
        assert_eq!(sha256(&x.join("disk.raw")), sha256(&raw));
        // The holes were not stored.
        assert!(std::fs::metadata(&tgz).unwrap().len() < 200_000);
        // And diskimg reads the member back, from the file and from a pipe.
        sh_ok(&format!(
            "{BIN} convert -O raw {}#disk.raw {}",
            s(&tgz),
            s(&p("c.raw"))
        ));
        assert_eq!(sha256(&p("c.raw")), sha256(&raw));
        sh_ok(&format!(
            "cat {} | {BIN} convert -O raw - {}",
            s(&tgz),
            s(&p("c.raw"))
        ));
        assert_eq!(sha256(&p("c.raw")), sha256(&raw));
    }
}

#[test]
fn gcp_tar_gz_from_a_vmdk_stream_larger_than_the_window() {
    // 80 MiB of data: more than the walk keeps, so the member cannot be sparse (its
    // map would come first) and is written as a regular one in the same pass.
    let dir = tempdir();
    let raw = qemu_raw(dir.path(), "d.raw", "96M", &["write -P 0x35 1M 80M"]);
    let p = |n: &str| dir.path().join(n);
    vmdk_to_stdout(&raw, &p("s.vmdk"));
    sh_ok(&format!(
        "cat {} | {BIN} convert --target gcp - {}",
        s(&p("s.vmdk")),
        s(&p("a.tar.gz"))
    ));
    let x = p("x");
    std::fs::create_dir(&x).unwrap();
    sh_ok(&format!("tar -C {} -xzf {}", s(&x), s(&p("a.tar.gz"))));
    assert_eq!(sha256(&x.join("disk.raw")), sha256(&raw));
}

/// An OVA's members, checked: order, manifest digests, descriptor, disk.
fn check_ova(ova: &Path, name: &str, raw: &Path) {
    let dir = ova.with_extension("x");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let o = Command::new("tar").arg("-tf").arg(ova).output().unwrap();
    assert!(o.status.success());
    let disk = format!("{name}-disk1.vmdk");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{name}.ovf\n{disk}\n{name}.mf\n")
    );
    sh_ok(&format!("tar -C {} -xf {}", s(&dir), s(ova)));
    // The manifest's lines `SHA256(FILE)= HEX`, checked by sha256sum.
    sh_ok(&format!(
        "cd {} && sed -E 's/^SHA256\\((.*)\\)= ([0-9a-f]{{64}})$/\\2  \\1/' {name}.mf | sha256sum -c --strict",
        s(&dir)
    ));
    let mf = std::fs::read_to_string(dir.join(format!("{name}.mf"))).unwrap();
    assert_eq!(mf.lines().count(), 2, "{mf}");
    let vmdk = dir.join(&disk);
    check_stream_vmdk(&vmdk, raw);
    // The descriptor: well-formed XML naming the disk with its real size.
    let size = std::fs::metadata(&vmdk).unwrap().len();
    let script = "import sys,xml.dom.minidom as m\nd=m.parse(sys.argv[1])\nf=d.getElementsByTagName('File')[0]\n\
         k=d.getElementsByTagName('Disk')[0]\nprint(f.getAttribute('ovf:href'),f.getAttribute('ovf:size'),\
         k.getAttribute('ovf:capacity'),k.getAttribute('ovf:format'),\
         d.getElementsByTagName('vssd:VirtualSystemType')[0].firstChild.data)";
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.join(format!("{name}.ovf")))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!(
            "{disk} {size} 73400320 http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized vmx-11"
        )
    );
}

#[test]
fn ova_for_vmware_and_virtualbox() {
    let dir = tempdir();
    let raw = source(dir.path());
    let p = |n: &str| dir.path().join(n);
    let q = p("d.qcow2");
    sh_ok(&format!(
        "qemu-img convert -f raw -O qcow2 {} {}",
        s(&raw),
        s(&q)
    ));
    sh_ok(&format!(
        "{BIN} convert -p --target ova {} {}",
        s(&q),
        s(&p("app.ova"))
    ));
    check_ova(&p("app.ova"), "app", &raw);
    // To stdout: two passes over the source; the same members.
    sh_ok(&format!(
        "{BIN} convert --target ova -o name=web,cpus=2,memory=2048,ostype=linux {} - > {}",
        s(&q),
        s(&p("w.ova"))
    ));
    check_ova(&p("w.ova"), "web", &raw);
    let ovf = Command::new("tar")
        .args(["-xOf", s(&p("w.ova")), "web.ovf"])
        .output()
        .unwrap();
    let ovf = String::from_utf8_lossy(&ovf.stdout);
    assert!(ovf.contains("<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>"));
    assert!(ovf.contains("vmw:osType=\"otherLinux64Guest\""));
    // A forward-only source cannot be read twice.
    let (ok, err) = sh(&format!(
        "cat {} | {BIN} convert --target ova - - >/dev/null",
        s(&q)
    ));
    assert!(!ok && err.contains("seekable source"), "{err}");
    // diskimg reads the OVA's disk back, from the file and from a pipe.
    for cmd in [
        format!(
            "{BIN} convert -O raw {} {}",
            s(&p("app.ova")),
            s(&p("b.raw"))
        ),
        format!(
            "cat {} | {BIN} convert -O raw - {}",
            s(&p("w.ova")),
            s(&p("b.raw"))
        ),
    ] {
        sh_ok(&cmd);
        assert_eq!(sha256(&p("b.raw")), sha256(&raw), "{cmd}");
    }
}
