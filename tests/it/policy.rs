//! The open policy judges referenced files by what they resolve to: symbolic links are
//! followed before `Beside`/`Relative` decide, FIFOs, sockets and devices are refused
//! unless allowed (and never hang the open), and differencing VHD/VHDX parents must be
//! the image they were made from whichever locator names them (issue 15 items 10, 11;
//! issue 19).

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use diskimg::{
    Error, Format, ImageOptions, OpenPolicy, OptionList, PathRule, SpecialFiles, create, open,
};
use diskimg_testutil::{qemu_create_overlay, qemu_img_ok, tempdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `f` on another thread and fails the test if it takes more than 20 s (a FIFO
/// open that blocks would otherwise hang the suite).
fn within_time<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the open hung (a FIFO was opened blocking?)")
}

fn mkfifo(p: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "mkfifo failed");
}

/// A secret outside the image's directory, and a VMDK descriptor in `dir` naming
/// `extent` as its FLAT extent.
fn flat_vmdk(dir: &Path, extent: &str) -> std::path::PathBuf {
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRW 8 FLAT \"{extent}\" 0\n\n\
         ddb.adapterType = \"ide\"\n"
    );
    let p = dir.join("disk.vmdk");
    std::fs::write(&p, desc).unwrap();
    p
}

/// A qcow2 image `name` in `dir` whose external data file is `dir/data` (absolute).
fn with_data_file(dir: &Path, name: &str, data: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let opt = format!("data_file={}", s(&dir.join(data)));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &opt, s(&p), "1M"]);
    p
}

fn denied(e: &Error) -> bool {
    matches!(e, Error::BackingDenied { .. })
}

#[test]
fn symlinked_extent_beside_the_image_is_judged_by_its_target() {
    let root = tempdir();
    let img_dir = root.path().join("images");
    std::fs::create_dir(&img_dir).unwrap();
    let secret = root.path().join("secret");
    std::fs::write(&secret, [0x5a; 4096]).unwrap();
    symlink(&secret, img_dir.join("disk-flat.vmdk")).unwrap();
    let vmdk = flat_vmdk(&img_dir, "disk-flat.vmdk");
    for policy in [OpenPolicy::qemu_compatible(), OpenPolicy::relative_only()] {
        let o = ImageOptions::read_only(true).with_policy(policy);
        let e = open(&vmdk, Some(Format::Vmdk), &o).unwrap_err();
        assert!(denied(&e), "{policy:?}: {e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
    // A link to a file that is itself beside the image is fine.
    std::fs::remove_file(img_dir.join("disk-flat.vmdk")).unwrap();
    std::fs::write(img_dir.join("real-flat.vmdk"), [7u8; 4096]).unwrap();
    symlink("real-flat.vmdk", img_dir.join("disk-flat.vmdk")).unwrap();
    let o = ImageOptions::read_only(true).with_policy(OpenPolicy::relative_only());
    let img = open(&vmdk, Some(Format::Vmdk), &o).unwrap();
    let mut buf = [0u8; 512];
    img.device.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7u8; 512]);
}

#[test]
fn symlinked_backing_file_under_relative_only() {
    let root = tempdir();
    let img_dir = root.path().join("images");
    std::fs::create_dir_all(img_dir.join("sub")).unwrap();
    let outside = root.path().join("outside.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&outside), "1M"]);
    symlink(&outside, img_dir.join("base.raw")).unwrap();
    let top = img_dir.join("top.qcow2");
    qemu_create_overlay(s(&top), "qcow2", "base.raw", "raw", Some("1M"));
    let rel = ImageOptions::read_only(true).with_policy(OpenPolicy::relative_only());
    let e = open(&top, None, &rel).unwrap_err();
    assert!(denied(&e) && e.to_string().contains("outside"), "{e}");
    // qemu-compatible follows it, as qemu does.
    let any = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
    assert!(open(&top, None, &any).unwrap().backing.is_some());
    // A link into a subdirectory of the image's directory stays allowed by Relative.
    std::fs::remove_file(img_dir.join("base.raw")).unwrap();
    std::fs::copy(&outside, img_dir.join("sub/base.raw")).unwrap();
    symlink("sub/base.raw", img_dir.join("base.raw")).unwrap();
    assert!(open(&top, None, &rel).unwrap().backing.is_some());
}

#[test]
fn fifos_and_devices_are_refused_without_hanging() {
    let dir = tempdir();
    let d = dir.path().to_path_buf();
    mkfifo(&d.join("fifo"));
    // A backing file, a data file and an extent that are FIFOs.
    let top = d.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&d.join("b.raw")), "1M"]);
    qemu_create_overlay(s(&top), "qcow2", "b.raw", "raw", Some("1M"));
    qemu_img_ok(&["rebase", "-u", "-b", "fifo", "-F", "raw", s(&top)]);
    let df = with_data_file(&d, "df.qcow2", "data.raw");
    std::fs::remove_file(d.join("data.raw")).unwrap();
    mkfifo(&d.join("data.raw"));
    let vmdk = flat_vmdk(&d, "fifo");
    for (path, fmt) in [
        (top, Format::Qcow2),
        (df.clone(), Format::Qcow2),
        (vmdk, Format::Vmdk),
    ] {
        let e = within_time(move || {
            let o = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
            open(&path, Some(fmt), &o).map(|_| ())
        })
        .unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }
    // A character device as a data file: refused unless the policy allows it.
    let df = with_data_file(&d, "dz.qcow2", "dz.raw");
    qemu_img_ok(&["amend", "-f", "qcow2", "-o", "data_file=/dev/zero", s(&df)]);
    let mut policy = OpenPolicy::qemu_compatible();
    let o = ImageOptions::read_only(true).with_policy(policy);
    let e = open(&df, Some(Format::Qcow2), &o).unwrap_err();
    assert!(e.to_string().contains("character device"), "{e}");
    policy.special_files = SpecialFiles::Allow;
    let o = ImageOptions::read_only(true).with_policy(policy);
    assert!(open(&df, Some(Format::Qcow2), &o).is_ok());
    // The image itself may not be a FIFO either (it could never be read by offset).
    let fifo = d.join("fifo");
    let e = within_time(move || open(&fifo, None, &ImageOptions::read_only(true)).map(|_| ()))
        .unwrap_err();
    assert!(e.to_string().contains("FIFO"), "{e}");
}

#[test]
fn metadata_only_opens_never_touch_the_data_file() {
    let dir = tempdir();
    let d = dir.path();
    let df = with_data_file(d, "df.qcow2", "data.raw");
    diskimg_testutil::qemu_io(&df, "qcow2", &["write -P 9 0 64k"]);
    std::fs::remove_file(d.join("data.raw")).unwrap();
    mkfifo(&d.join("data.raw"));
    let o = ImageOptions::read_only(true)
        .with_policy(OpenPolicy::qemu_compatible())
        .with_metadata_only(true);
    let img = within_time(move || open(&df, None, &o)).unwrap();
    assert_eq!(img.device.virtual_size(), 1 << 20);
    let mut buf = [0u8; 512];
    let e = img.device.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("not opened"), "{e}");
}

#[test]
fn vhdx_child_without_linkage_reads_no_host_vhdx() {
    let dir = tempdir();
    let d = dir.path();
    // Some unrelated VHDX on the host, named by absolute path.
    let victim = d.join("victim.vhdx");
    qemu_img_ok(&["create", "-q", "-f", "vhdx", s(&victim), "8M"]);
    // A child created while its parent could not be read: zero parent_linkage.
    let child = d.join("child.vhdx");
    let o = OptionList::parse(&format!("backing_file={},backing_fmt=vhdx", s(&victim))).unwrap();
    create(
        &child,
        Format::Vhdx,
        Some(8 << 20),
        o,
        &ImageOptions::default(),
    )
    .unwrap();
    let any = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
    let e = open(&child, Some(Format::Vhdx), &any).unwrap_err();
    assert!(e.to_string().contains("parent_linkage is zero"), "{e}");
    // Explicitly waived, it opens.
    let mut force = any.clone();
    force.driver_options.set("check_parent_linkage", "off");
    assert!(
        open(&child, Some(Format::Vhdx), &force)
            .unwrap()
            .backing
            .is_some()
    );
}

#[test]
fn vhd_child_refuses_a_parent_of_another_format() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.vhd");
    qemu_img_ok(&["create", "-q", "-f", "vpc", s(&base), "4M"]);
    let child = d.join("child.vhd");
    let o = OptionList::parse("backing_file=base.vhd,backing_fmt=vpc").unwrap();
    let any = ImageOptions::default().with_policy(OpenPolicy::qemu_compatible());
    create(&child, Format::Vpc, None, o, &any).unwrap();
    let img = open(&child, Some(Format::Vpc), &any).unwrap();
    let raw = open(&base, Some(Format::Raw), &ImageOptions::read_only(true)).unwrap();
    let e = img.device.set_backing(Some(raw.device)).unwrap_err();
    assert!(e.to_string().contains("must be a VHD"), "{e}");
}

#[test]
fn policy_rules_survive_directory_symlinks() {
    // The image reached through a symlinked directory: "beside" means beside its real
    // directory, so a plain name still works.
    let root = tempdir();
    let real = root.path().join("real");
    std::fs::create_dir(&real).unwrap();
    symlink(&real, root.path().join("link")).unwrap();
    std::fs::write(real.join("disk-flat.vmdk"), [3u8; 4096]).unwrap();
    flat_vmdk(&real, "disk-flat.vmdk");
    let policy = OpenPolicy {
        extents: PathRule::Beside,
        ..OpenPolicy::deny_all()
    };
    let o = ImageOptions::read_only(true).with_policy(policy);
    let img = open(root.path().join("link/disk.vmdk"), Some(Format::Vmdk), &o).unwrap();
    assert_eq!(img.device.virtual_size(), 4096);
}

/// A `json:{…}` backing name opens the format on the file it names, through a `raw` node
/// with `size` (writes past it fail with ENOSPC, as qemu's raw driver) and through filter
/// nodes the caller supplies; its file is judged by the policy like any backing file, and
/// a filter driver the caller does not supply is refused with qemu's message.
#[test]
fn json_backing_names_open_through_their_nodes_under_the_policy() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    let io = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 64k", s(&base)])
        .output()
        .expect("qemu-io is not installed (apt-get install qemu-utils)");
    assert!(io.status.success(), "{io:?}");
    let len = std::fs::metadata(&base).unwrap().len();
    let make = |name: &str, backing: &str| {
        let top = d.join(name);
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            "qcow2",
            s(&top),
            "1M",
        ]);
        top
    };
    let raw = format!(
        "json:{{'driver': 'qcow2', 'file': {{'driver': 'raw', 'size': {len}, 'file': {{'driver': 'file', 'filename': '{}'}}}}}}",
        s(&base)
    );
    let top = make("top.qcow2", &raw);
    let mut opts = ImageOptions::default().with_policy(OpenPolicy::qemu_compatible());
    opts.backing_writable = true;
    let img = open(&top, None, &opts).unwrap();
    let mut buf = vec![0u8; 4096];
    img.device.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    // The raw node is `len` bytes: a new cluster of the backing image does not fit.
    let backing = img.backing.as_ref().unwrap();
    let e = backing.device.write_at(&buf, 512 << 10).unwrap_err();
    assert!(e.to_string().contains("No space left on device"), "{e}");
    drop(img);
    // The default policy opens no backing file, json: names included.
    let e = open(&top, None, &ImageOptions::read_only(true)).unwrap_err();
    assert!(denied(&e), "{e}");
    // A filter node needs its driver.
    let blkdebug = format!(
        "json:{{'driver': 'qcow2', 'file': {{'driver': 'blkdebug', 'image': {{'driver': 'file', 'filename': '{}'}}}}}}",
        s(&base)
    );
    let top = make("top2.qcow2", &blkdebug);
    let ro = ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible());
    let e = open(&top, None, &ro).unwrap_err();
    assert!(e.to_string().contains("Unknown driver 'blkdebug'"), "{e}");
    let mut with = ro.clone();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = seen.clone();
    let driver: diskimg::NodeDriver = std::sync::Arc::new(move |_o: &OptionList| {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(diskimg::FilterNode {
            child: "image".into(),
            wrap: std::sync::Arc::new(|s| s),
        })
    });
    with.node_drivers = diskimg::NodeDrivers(vec![("blkdebug".into(), driver)]);
    assert!(open(&top, None, &with).unwrap().backing.is_some());
    assert!(seen.load(std::sync::atomic::Ordering::SeqCst));
}
