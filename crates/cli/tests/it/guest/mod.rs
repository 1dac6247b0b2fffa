//! A real KVM guest on disks served by `diskimg serve`: four over vhost-user-blk and
//! three over NBD, from qcow2 (with a raw backing file), vhdx and vmdk images. One
//! vhost-user-blk disk is served with `--cache none`, so that its `O_DIRECT` defaults
//! (16 workers per queue, the driver notified per request, nothing split) meet a
//! guest's filesystem I/O; the others use the page cache. The guest
//! makes ext4 filesystems, writes and deletes trees of fsync'd files, runs fstrim and
//! verifies its sums; afterwards every image passes `qemu-img check`, `e2fsck` on the
//! converted raw is clean and the files read back (debugfs) with the guest's sums. On
//! the crash disk the server is killed with SIGKILL in the middle of the guest's write
//! load and restarted (QEMU's NBD client reconnects): everything the guest fsync'd
//! before the kill, and everything it wrote after the restart, is there afterwards (the
//! file in flight at the kill is exempt: see `IN_FLIGHT_AT_KILL`). The sixth disk is served read-only: the guest sees it read-only,
//! its write is refused, it reads the image's content, and the files stay unchanged.
//!
//! One boot, about a minute with KVM (a few under TCG). `DISKIMG_GUEST_LONG=1` writes more files.

mod kit;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::s;
use crate::serve::{Served, tool, tool_ok};

/// One disk of the guest.
struct Disk {
    /// Guest device name (PCI order).
    dev: &'static str,
    fmt: &'static str,
    vhost: bool,
    /// Served read-only (`-r`); the guest only reads it.
    ro: bool,
    /// Served with `--cache none` (vhost-user-blk: `O_DIRECT` and its defaults).
    direct: bool,
    image: PathBuf,
}

fn make_image(dir: &Path, name: &str, fmt: &str, ro: bool) -> PathBuf {
    let p = dir.join(format!("{name}.{fmt}"));
    if ro {
        // Small (the guest hashes all of it): data in the backing file and the top.
        let base = dir.join(format!("{name}-base.raw"));
        qemu_img_ok(&["create", "-q", "-f", "raw", s(&base), "16M"]);
        qemu_io(&base, "raw", &["write -P 0x5a 0 1M", "write -P 0x5b 8M 2M"]);
        let b = base.file_name().unwrap().to_string_lossy().into_owned();
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", s(&p)]);
        qemu_io(
            &p,
            "qcow2",
            &["write -P 0x77 512k 1M", "write -P 0x78 15M 64k"],
        );
    } else if fmt == "qcow2" {
        let base = dir.join(format!("{name}-base.raw"));
        qemu_img_ok(&["create", "-q", "-f", "raw", s(&base), "128M"]);
        qemu_io(
            &base,
            "raw",
            &["write -P 0x5a 0 1M", "write -P 0x5b 100M 4M"],
        );
        let b = base.file_name().unwrap().to_string_lossy().into_owned();
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", s(&p)]);
    } else {
        qemu_img_ok(&["create", "-q", "-f", fmt, s(&p), "128M"]);
    }
    p
}

fn serve(dir: &Path, d: &Disk) -> (Served, PathBuf) {
    let name = format!("disk-{}", d.dev);
    if d.vhost {
        let sock = dir.join(format!("{name}.vhost"));
        let k = sock.to_string_lossy().into_owned();
        let mode: &[&str] = if d.ro {
            &["-r"]
        } else {
            &["--discard", "unmap"]
        };
        let mut args = vec!["--vhost-user-blk", &k, "--num-queues", "2"];
        if d.direct {
            // `O_DIRECT` with its defaults: 16 workers per queue, the driver notified
            // per request, nothing split.
            args.extend_from_slice(&["--cache", "none"]);
        } else {
            // Page cache: the guest's large requests at queue depth 1 are split (64
            // KiB pieces, so that its 128-256 KiB requests are too).
            args.extend_from_slice(&["--split-kib", "64"]);
        }
        args.extend_from_slice(mode);
        args.extend_from_slice(&["-f", d.fmt, s(&d.image)]);
        (Served::diskimg_at(&sock, &args), sock)
    } else {
        let srv = Served::diskimg(
            dir,
            &name,
            &["--discard", "unmap", "-f", d.fmt, s(&d.image)],
        );
        let sock = srv.sock.clone();
        (srv, sock)
    }
}

#[test]
fn kvm_guest_on_served_disks() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is needed for the guest test"
    );
    let long = std::env::var_os("DISKIMG_GUEST_LONG").is_some();
    let dir = tempdir();
    let kernel = kit::kernel(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let init = include_str!("init.sh");
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(&initrd, kit::initramfs(&kernel, init)).unwrap();

    // (guest device in PCI order, format, over vhost-user?, read-only?, --cache none?)
    let disks: Vec<Disk> = [
        ("vda", "qcow2", true, false, false),
        ("vdb", "qcow2", false, false, false),
        ("vdc", "vhdx", true, false, false),
        ("vdd", "vmdk", false, false, false),
        ("vde", "qcow2", false, false, false),
        ("vdf", "qcow2", true, true, false),
        ("vdg", "qcow2", true, false, true),
    ]
    .into_iter()
    .map(|(dev, fmt, vhost, ro, direct)| Disk {
        dev,
        fmt,
        vhost,
        ro,
        direct,
        image: make_image(dir.path(), dev, fmt, ro),
    })
    .collect();
    let ro_files_before = ro_file_sums(&disks[5]);
    let mut servers: Vec<(Served, PathBuf)> = disks.iter().map(|d| serve(dir.path(), d)).collect();
    for (d, (srv, _)) in disks.iter().zip(&servers) {
        let base = d.image.with_file_name(format!("{}-base.raw", d.dev));
        for f in [&d.image, &base].into_iter().filter(|f| f.exists()) {
            let direct = crate::serve_cache::direct_of(srv.pid(), f);
            assert_eq!(direct, Some(d.direct), "{}: O_DIRECT of {f:?}", d.dev);
        }
    }

    let files = if long { 60 } else { 8 };
    let crash_files = if long { 120 } else { 24 };
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet FILES={files} TREE_DISKS=vda,vdb,vdc,vdd,vdg RO_DISK=vdf CRASH_DISK=vde CRASH_FILES={crash_files}"
    );
    let socks: Vec<PathBuf> = servers.iter().map(|(_, p)| p.clone()).collect();
    let (mut qemu, rx) = boot_until_console(&kernel.vmlinuz, &initrd, &cmdline, &disks, &socks);
    // Watch the console; kill -9 the crash disk's server after a few fsync'd files.
    let deadline = Instant::now() + Duration::from_secs(if long { 1800 } else { 600 });
    let mut log = Vec::new();
    let mut killed = false;
    let mut fsynced_before_kill = 0;
    let mut kill_at = 0;
    loop {
        let line = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    let _ = qemu.kill();
                    panic!("guest timed out:\n{}", log.join("\n"));
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        eprintln!("guest: {line}");
        let fsynced = line.starts_with("FSYNCED ");
        log.push(line);
        if fsynced && !killed && log.iter().filter(|l| l.starts_with("FSYNCED ")).count() == 6 {
            killed = true;
            fsynced_before_kill = 6;
            kill_at = log.len();
            let (srv, _) = servers.remove(4);
            let st = srv.signal("KILL");
            assert!(!st.success());
            std::thread::sleep(Duration::from_millis(300));
            servers.insert(4, serve(dir.path(), &disks[4]));
        }
    }
    let status = qemu.wait().unwrap();
    let text = log.join("\n");
    assert!(status.success(), "qemu: {status}\n{text}");
    assert!(!text.contains("GUEST-FAIL"), "{text}");
    assert!(text.contains("GUEST-DONE"), "{text}");
    assert!(killed, "the crash load never started:\n{text}");
    for (srv, _) in servers {
        srv.stop();
    }
    assert!(fsynced_before_kill > 0);
    check_read_only(dir.path(), &disks[5], &text, &ro_files_before);
    let rw: Vec<&Disk> = disks.iter().filter(|d| !d.ro).collect();
    check_disks(dir.path(), &rw, &log, crash_files, kill_at);
}

/// sha256 of the read-only disk's files (the qcow2 and its backing file).
fn ro_file_sums(d: &Disk) -> String {
    let base = d.image.with_file_name(format!("{}-base.raw", d.dev));
    tool_ok("sha256sum", &[s(&d.image), s(&base)])
}

/// The read-only disk: the guest saw it read-only, its write failed, it read the
/// image's content, and both files are unchanged byte for byte.
fn check_read_only(dir: &Path, d: &Disk, text: &str, before: &str) {
    let refused = format!("RO-WRITE-REFUSED {}", d.dev);
    assert!(text.contains(&refused), "{}: {text}", d.dev);
    let raw = dir.join(format!("{}.raw", d.dev));
    qemu_img_ok(&["convert", "-f", d.fmt, "-O", "raw", s(&d.image), s(&raw)]);
    let want = tool_ok("sha256sum", &[s(&raw)]);
    let want = format!(
        "ROSUM {} {}",
        d.dev,
        want.split_whitespace().next().unwrap()
    );
    assert!(text.contains(&want), "{want}: {text}");
    assert_eq!(ro_file_sums(d), before, "the read-only image changed");
    qemu_img_ok(&["check", "-f", d.fmt, s(&d.image)]);
}

/// QEMU's arguments for the guest with `accel`.
fn qemu_args(
    accel: &str,
    vmlinuz: &Path,
    initrd: &Path,
    cmdline: &str,
    disks: &[Disk],
    socks: &[PathBuf],
) -> Vec<String> {
    let mem = "512M";
    let mut args: Vec<String> = [
        "-accel",
        accel,
        "-m",
        mem,
        "-smp",
        "2",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-numa",
        "node,memdev=mem",
        "-kernel",
        s(vmlinuz),
        "-initrd",
        s(initrd),
        "-append",
        cmdline,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if accel == "kvm" {
        args.extend(["-cpu".to_string(), "host".to_string()]);
    }
    for (i, (d, sock)) in disks.iter().zip(socks).enumerate() {
        if d.vhost {
            args.push("-chardev".into());
            args.push(format!("socket,id=vu{i},path={}", sock.display()));
            args.push("-device".into());
            args.push(format!("vhost-user-blk-pci,chardev=vu{i},num-queues=2"));
        } else {
            args.push("-blockdev".into());
            args.push(format!(
                "driver=nbd,node-name=nbd{i},server.type=unix,server.path={},reconnect-delay=30",
                sock.display()
            ));
            args.push("-device".into());
            args.push(format!("virtio-blk-pci,drive=nbd{i}"));
        }
    }
    args
}

/// Whether `/dev/kvm` is PVM's (the `kvm_pvm` module: KVM without VMX/SVM inside a VM,
/// as on this workplace's Firecracker hosts). PVM runs a guest kernel built for it
/// (`CONFIG_PVM_GUEST`) at full speed; Debian's kernel it runs only by trapping nearly
/// every instruction, far slower than TCG (docs/serve.md, "The guest test").
fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// SIGABRT on Linux: how QEMU ends on a failed assertion.
const SIGABRT: i32 = 6;

/// Boots with KVM; when the guest prints nothing within 30 s (a KVM that cannot run
/// this kernel), boots again with TCG. Under PVM it boots with TCG straight away.
/// `DISKIMG_GUEST_ACCEL` forces one. Returns QEMU and its console lines (from
/// `GUEST-START` on).
fn boot_until_console(
    vmlinuz: &Path,
    initrd: &Path,
    cmdline: &str,
    disks: &[Disk],
    socks: &[PathBuf],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let forced = std::env::var("DISKIMG_GUEST_ACCEL").ok();
    let accels: Vec<String> = match forced {
        Some(a) => vec![a],
        None if kvm_is_pvm() => vec!["tcg".into()],
        None => vec!["kvm".into(), "tcg".into()],
    };
    // QEMU 10.0's TCG can abort during boot in its own code (seen once in a loaded CI
    // run: `iotlb_to_section: Assertion 'section_index < d->map.sections_nb' failed`,
    // before the guest printed anything). One such abort gets one more boot with the
    // same accelerator; the servers take the new connection as they do a reboot.
    let mut aborted_once = false;
    let mut n = 0;
    while let Some(accel) = accels.get(n) {
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(qemu_args(accel, vmlinuz, initrd, cmdline, disks, socks))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run qemu-system-x86_64 (install qemu-system-x86, see .ci/run)");
        let (tx, rx) = mpsc::channel();
        let out = qemu.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let last = n + 1 == accels.len();
        let wait = Instant::now() + Duration::from_secs(if last { 300 } else { 30 });
        while Instant::now() < wait {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(l) if l.contains("GUEST-START") => {
                    eprintln!("guest: booted with {accel}");
                    return (qemu, rx);
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = qemu.kill();
        let status = qemu.wait();
        let aborted = matches!(&status, Ok(s) if s.signal() == Some(SIGABRT));
        eprintln!("guest: no console with {accel} (qemu: {status:?})");
        if aborted && !aborted_once {
            aborted_once = true;
            eprintln!("guest: qemu aborted before the console; booting once more");
            continue;
        }
        n += 1;
    }
    panic!("the guest did not boot with {accels:?}");
}

/// After the guest: images check clean, the filesystems fsck clean, files match.
/// Files of the crash disk whose write may have been in flight when the server was
/// killed: the first ones reported fsync'd after the kill. Their writes can have been
/// acknowledged by the killed server and never flushed, and QEMU's NBD client sends the
/// guest's flush to the restarted server, which succeeds: NBD promises nothing for writes
/// not flushed before a disconnect (qemu-nbd loses them too, its L2 cache is write-back).
/// One file is in flight at a time; the second covers console lag.
const IN_FLIGHT_AT_KILL: usize = 2;

/// Every file the guest reported with its sum, per disk; on the crash disk, all but the
/// files in flight at the kill (`kill_at` is the console line of the kill).
fn reported_sums(log: &[String], kill_at: usize) -> BTreeMap<&str, Vec<(&str, &str)>> {
    let mut sums: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    let mut after_kill = 0;
    for (i, l) in log.iter().enumerate() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let ["SUM" | "FSYNCED", dev, path, sum] = f[..] {
            if f[0] == "FSYNCED" && i >= kill_at {
                after_kill += 1;
                if after_kill <= IN_FLIGHT_AT_KILL {
                    eprintln!("{dev} {path}: in flight at the kill, not compared");
                    continue;
                }
            }
            sums.entry(dev).or_default().push((path, sum));
        }
    }
    sums
}

fn check_disks(dir: &Path, disks: &[&Disk], log: &[String], crash_files: usize, kill_at: usize) {
    let sums = reported_sums(log, kill_at);
    for d in disks {
        let text = log.join("\n");
        if d.dev != "vde" {
            assert!(
                text.contains(&format!("VERIFIED {}", d.dev)),
                "{}: {text}",
                d.dev
            );
        }
        let o = qemu_img(&["check", "-f", d.fmt, s(&d.image)]);
        let leaks_ok = d.dev == "vde" && o.status.code() == Some(3);
        assert!(
            o.status.success() || leaks_ok,
            "{}: qemu-img check: {}",
            d.dev,
            String::from_utf8_lossy(&o.stdout)
        );
        let raw = dir.join(format!("{}.raw", d.dev));
        qemu_img_ok(&["convert", "-f", d.fmt, "-O", "raw", s(&d.image), s(&raw)]);
        let fsck = tool("e2fsck", &["-fn", s(&raw)]);
        assert!(
            fsck.status.success(),
            "{}: e2fsck: {}",
            d.dev,
            String::from_utf8_lossy(&fsck.stdout)
        );
        let files = sums.get(d.dev).cloned().unwrap_or_default();
        let want = if d.dev == "vde" {
            crash_files - IN_FLIGHT_AT_KILL
        } else {
            1
        };
        assert!(files.len() >= want, "{}: {} files", d.dev, files.len());
        for (path, sum) in files {
            let out = dir.join("dumped");
            tool_ok(
                "debugfs",
                &["-R", &format!("dump {path} {}", out.display()), s(&raw)],
            );
            let got = tool_ok("sha256sum", &[s(&out)]);
            assert_eq!(got.split_whitespace().next(), Some(sum), "{} {path}", d.dev);
            std::fs::remove_file(&out).unwrap();
        }
    }
}
