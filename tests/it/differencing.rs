//! Differencing VHD and VHDX through the facade: the parent is found through whichever
//! locator still resolves after the files move, and a parent that is not the one the
//! child was made from is refused.

use std::path::Path;

use diskimg::{Format, ImageOptions, OpenPolicy, OptionList, create, open};
use diskimg_testutil::{qemu_img_ok, qemu_info_json, qemu_io, read_all, tempdir};

fn opts() -> ImageOptions {
    ImageOptions::read_only(true).with_policy(OpenPolicy::qemu_compatible())
}

/// Creates a child of `parent` (named as given) at `child`.
fn child(child: &Path, fmt: Format, parent: &str) {
    let o =
        OptionList::parse(&format!("backing_file={parent},backing_fmt={}", fmt.name())).unwrap();
    create(child, fmt, None, o, &opts()).unwrap();
}

/// The locator entries (platform code, decoded payload) of a differencing VHD.
fn vhd_locators(path: &Path) -> Vec<(String, String)> {
    let f = std::fs::read(path).unwrap();
    let h = 512;
    let mut v = Vec::new();
    for i in 0..8 {
        let e = h + 576 + i * 24;
        let code = &f[e..e + 4];
        if code == [0; 4] {
            continue;
        }
        let len = u32::from_be_bytes(f[e + 8..e + 12].try_into().unwrap()) as usize;
        let off = u64::from_be_bytes(f[e + 16..e + 24].try_into().unwrap()) as usize;
        let data = &f[off..off + len];
        let text = if code == b"MacX" {
            String::from_utf8(data.to_vec()).unwrap()
        } else {
            let u: Vec<u16> = data
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .collect();
            String::from_utf16(&u).unwrap()
        };
        v.push((String::from_utf8_lossy(code).into_owned(), text));
    }
    v
}

fn vhd_parent(dir: &Path) -> Vec<u8> {
    let base = dir.join("base.vhd");
    qemu_img_ok(&["create", "-q", "-f", "vpc", base.to_str().unwrap(), "4M"]);
    qemu_io(&base, "vpc", &["write -P 7 0 1M", "write -P 8 3M 512k"]);
    read_all(
        open(&base, Some(Format::Vpc), &opts())
            .unwrap()
            .device
            .as_ref(),
    )
}

#[test]
fn vhd_locators_both_forms_and_whichever_resolves() {
    let dir = tempdir();
    let a = dir.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let a = a.canonicalize().unwrap();
    let want = vhd_parent(&a);
    let abs = a.join("base.vhd");
    let abs_win = abs.to_str().unwrap().replace('/', "\\");
    // Relative name given: W2ku derived from the image's directory, MacX too.
    child(&a.join("rel.vhd"), Format::Vpc, "base.vhd");
    assert_eq!(
        vhd_locators(&a.join("rel.vhd")),
        vec![
            ("W2ku".to_string(), abs_win.clone()),
            ("W2ru".to_string(), ".\\base.vhd".to_string()),
            (
                "MacX".to_string(),
                format!("file://{}", abs.to_str().unwrap())
            ),
        ]
    );
    // Absolute name given: W2ru derived.
    std::fs::create_dir(a.join("sub")).unwrap();
    child(&a.join("sub/abs.vhd"), Format::Vpc, abs.to_str().unwrap());
    assert_eq!(
        vhd_locators(&a.join("sub/abs.vhd"))[..2],
        [
            ("W2ku".to_string(), abs_win),
            ("W2ru".to_string(), "..\\base.vhd".to_string()),
        ]
    );
    // qemu opens our children (as standalone dynamic disks: it ignores parents).
    assert_eq!(
        qemu_info_json(&a.join("rel.vhd"), "vpc")["virtual-size"],
        qemu_info_json(&abs, "vpc")["virtual-size"]
    );
    let reads = |p: &Path| {
        let img = open(p, Some(Format::Vpc), &opts()).unwrap();
        assert!(img.backing.is_some());
        read_all(img.device.as_ref())
    };
    assert_eq!(reads(&a.join("rel.vhd")), want);
    assert_eq!(reads(&a.join("sub/abs.vhd")), want);
    // The relative child moved away alone: only W2ku (absolute) resolves.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::copy(a.join("rel.vhd"), elsewhere.join("rel.vhd")).unwrap();
    assert_eq!(reads(&elsewhere.join("rel.vhd")), want);
    // The whole directory moved: the absolute names are stale, W2ru resolves.
    let moved = dir.path().join("moved");
    std::fs::rename(&a, &moved).unwrap();
    assert_eq!(reads(&moved.join("sub/abs.vhd")), want);
    // A file with the parent's name that is not the parent is skipped for the next
    // locator: put another VHD at the relative location, the real one stays absolute.
    std::fs::rename(&moved, &a).unwrap();
    std::fs::create_dir(elsewhere.join("a2")).unwrap();
    std::fs::copy(a.join("rel.vhd"), elsewhere.join("a2/rel.vhd")).unwrap();
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "vpc",
        elsewhere.join("a2/base.vhd").to_str().unwrap(),
        "4M",
    ]);
    assert_eq!(reads(&elsewhere.join("a2/rel.vhd")), want);
    // Only the wrong file resolves: refused with the reason.
    std::fs::rename(a.join("base.vhd"), a.join("gone.vhd")).unwrap();
    std::fs::copy(elsewhere.join("a2/base.vhd"), elsewhere.join("base.vhd")).unwrap();
    let e = open(elsewhere.join("rel.vhd"), Some(Format::Vpc), &opts()).unwrap_err();
    assert!(e.to_string().contains("unique id"), "{e}");
}

#[test]
fn vhdx_parent_linkage_is_verified() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.vhdx");
    qemu_img_ok(&["create", "-q", "-f", "vhdx", base.to_str().unwrap(), "8M"]);
    qemu_io(&base, "vhdx", &["write -P 5 0 1M"]);
    child(&d.join("child.vhdx"), Format::Vhdx, "base.vhdx");
    let img = open(d.join("child.vhdx"), Some(Format::Vhdx), &opts()).unwrap();
    assert!(img.backing.is_some());
    let before = read_all(img.device.as_ref());
    drop(img);
    // Opening the parent read-write without writing keeps its DataWriteGuid.
    let rw = ImageOptions::read_only(false).with_policy(OpenPolicy::qemu_compatible());
    drop(open(&base, Some(Format::Vhdx), &rw).unwrap());
    assert_eq!(
        read_all(
            open(d.join("child.vhdx"), Some(Format::Vhdx), &opts())
                .unwrap()
                .device
                .as_ref()
        ),
        before
    );
    // A write to the parent (here by qemu) gives it a new DataWriteGuid: refused.
    qemu_io(&base, "vhdx", &["write -P 6 2M 64k"]);
    let e = open(d.join("child.vhdx"), Some(Format::Vhdx), &opts()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("DataWriteGuid") && msg.contains("parent_linkage"),
        "{msg}"
    );
    // The override opens it anyway (and reads the modified parent).
    let mut force = opts();
    force.driver_options.set("check_parent_linkage", "off");
    let img = open(d.join("child.vhdx"), Some(Format::Vhdx), &force).unwrap();
    let after = read_all(img.device.as_ref());
    assert_eq!(after[2 << 20..(2 << 20) + 65536], [6u8; 65536]);
    assert_eq!(after[..1 << 20], before[..1 << 20]);
    // A bad override value is refused by name.
    force.driver_options.set("check_parent_linkage", "maybe");
    let e = open(d.join("child.vhdx"), Some(Format::Vhdx), &force).unwrap_err();
    assert!(e.to_string().contains("check_parent_linkage"), "{e}");
    // Writing through our own device changes the GUID too.
    let base2 = d.join("b2.vhdx");
    qemu_img_ok(&["create", "-q", "-f", "vhdx", base2.to_str().unwrap(), "8M"]);
    child(&d.join("c2.vhdx"), Format::Vhdx, "b2.vhdx");
    let p = open(&base2, Some(Format::Vhdx), &rw).unwrap();
    p.device.write_at(&[1u8; 512], 0).unwrap();
    p.device.flush().unwrap();
    drop(p);
    assert!(open(d.join("c2.vhdx"), Some(Format::Vhdx), &opts()).is_err());
}

/// VHDX children name the parent by `relative_path` and `absolute_win32_path` (derived
/// from the other), and open after either the child alone or the whole directory moved.
#[test]
fn vhdx_locator_both_forms() {
    let dir = tempdir();
    let a = dir.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let a = a.canonicalize().unwrap();
    let base = a.join("base.vhdx");
    qemu_img_ok(&["create", "-q", "-f", "vhdx", base.to_str().unwrap(), "8M"]);
    qemu_io(&base, "vhdx", &["write -P 5 0 1M"]);
    let want = read_all(
        open(&base, Some(Format::Vhdx), &opts())
            .unwrap()
            .device
            .as_ref(),
    );
    child(&a.join("rel.vhdx"), Format::Vhdx, "base.vhdx");
    let img = open(a.join("rel.vhdx"), Some(Format::Vhdx), &opts()).unwrap();
    let bref = img.device.info().backing.unwrap();
    assert_eq!(bref.filename, "base.vhdx");
    assert_eq!(bref.alternates, vec![base.to_str().unwrap().to_string()]);
    drop(img);
    std::fs::create_dir(a.join("sub")).unwrap();
    child(
        &a.join("sub/abs.vhdx"),
        Format::Vhdx,
        base.to_str().unwrap(),
    );
    let bref = open(a.join("sub/abs.vhdx"), Some(Format::Vhdx), &opts())
        .unwrap()
        .device
        .info()
        .backing
        .unwrap();
    assert_eq!(
        (bref.filename.as_str(), bref.alternates.as_slice()),
        ("../base.vhdx", &[base.to_str().unwrap().to_string()][..])
    );
    let reads = |p: &Path| {
        read_all(
            open(p, Some(Format::Vhdx), &opts())
                .unwrap()
                .device
                .as_ref(),
        )
    };
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::copy(a.join("rel.vhdx"), elsewhere.join("rel.vhdx")).unwrap();
    assert_eq!(reads(&elsewhere.join("rel.vhdx")), want);
    let moved = dir.path().join("moved");
    std::fs::rename(&a, &moved).unwrap();
    assert_eq!(reads(&moved.join("sub/abs.vhdx")), want);
}
