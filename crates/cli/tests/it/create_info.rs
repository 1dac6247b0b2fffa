//! create and info against qemu-img.

use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_info_json, tempdir};
use serde_json::Value;

use crate::{FORMATS, diskimg, diskimg_ok, s};

/// Removes keys that legitimately differ (paths, host allocation).
fn scrub(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for k in ["filename", "actual-size", "full-backing-filename"] {
                m.remove(k);
            }
            m.values_mut().for_each(scrub);
        }
        Value::Array(a) => a.iter_mut().for_each(scrub),
        _ => {}
    }
}

#[test]
fn create_output_and_info_json_match_qemu() {
    let dir = tempdir();
    for fmt in FORMATS {
        let ours = dir.path().join(format!("ours.{fmt}"));
        let theirs = dir.path().join(format!("theirs.{fmt}"));
        let a = diskimg_ok(&["create", "-f", fmt, s(&ours), "64M"]);
        let b = qemu_img_ok(&["create", "-f", fmt, s(&theirs), "64M"]);
        // Every `key=value` we print appears in qemu's line (qemu adds defaults).
        let (a, b) = (a.replace(s(&ours), "X"), b.replace(s(&theirs), "X"));
        assert!(a.starts_with(&format!("Formatting 'X', fmt={fmt} ")), "{a}");
        for tok in a.split_whitespace() {
            assert!(
                b.split_whitespace().any(|t| t == tok),
                "{fmt}: {tok} not in {b}"
            );
        }
        // qemu reads our image as we read theirs, and both agree on each file.
        for file in [&ours, &theirs] {
            let mut q = qemu_info_json(file, fmt);
            let mut d: Value =
                serde_json::from_str(&diskimg_ok(&["info", "-f", fmt, "--output=json", s(file)]))
                    .unwrap();
            assert_eq!(d["filename"], Value::from(s(file)));
            scrub(&mut q);
            scrub(&mut d);
            assert_eq!(d, q, "{fmt}: info JSON of {file:?}");
        }
    }
}

#[test]
fn info_text_and_json_bytes_match_qemu_on_same_file() {
    let dir = tempdir();
    let p = crate::qemu_raw(dir.path(), "a.raw", "64M", &["write -P 0xab 1M 64k"]);
    // Same file, same stat: the outputs must be byte-identical.
    for args in [
        vec!["info", "-f", "raw"],
        vec!["info"],
        vec!["info", "-f", "raw", "--output=json"],
        vec!["info", "--backing-chain", "--output=json"],
    ] {
        let mut a = args.clone();
        a.push(s(&p));
        let ours = diskimg_ok(&a);
        let theirs = qemu_img_ok(&a);
        assert_eq!(ours, theirs, "{args:?}");
    }
}

#[test]
fn create_option_variants() {
    let dir = tempdir();
    let p = dir.path().join("p.raw");
    let q = dir.path().join("q.raw");
    let a = diskimg_ok(&[
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=full",
        s(&p),
        "1M",
    ]);
    let b = qemu_img_ok(&[
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=full",
        s(&q),
        "1M",
    ]);
    assert_eq!(a.replace(s(&p), "X"), b.replace(s(&q), "X"));
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    // Size given only through -o.
    let r = dir.path().join("r.raw");
    diskimg_ok(&["create", "-q", "-f", "raw", "-o", "size=2M", s(&r)]);
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 2 << 20);
    // -o help lists the driver's options in qemu's layout (qemu adds the file
    // protocol's extent_size_hint and nocow, which we do not offer).
    let ours = diskimg_ok(&["create", "-f", "raw", "-o", "help", "x"]);
    let theirs = qemu_img_ok(&["create", "-f", "raw", "-o", "help", "x"]);
    for line in ours.lines() {
        assert!(
            theirs.lines().any(|l| l == line),
            "{line:?} not in {theirs}"
        );
    }
    // A backing file on raw is refused by both.
    let bad = dir.path().join("bad.raw");
    let o = diskimg(&[
        "create",
        "-f",
        "raw",
        "-b",
        s(&p),
        "-F",
        "raw",
        s(&bad),
        "1M",
    ]);
    assert_eq!(crate::code(&o), 1);
    assert_eq!(
        qemu_img(&[
            "create",
            "-f",
            "raw",
            "-b",
            s(&p),
            "-F",
            "raw",
            s(&bad),
            "1M"
        ])
        .status
        .code(),
        Some(1)
    );
}

/// Lines of our `-o help` that qemu lacks: diskimg's own create options (documented in
/// docs/cli.md and the format docs).
const EXTENSIONS: &[&str] = &[
    "  azure_align=<bool (on/off)> - Round the virtual size up to a multiple of 1 MiB and store it exactly (implies force_size; Azure requires it, with subformat=fixed)",
    "  backing_file=<str>     - Parent VHD: creates a differencing disk (not in qemu)",
    "  backing_fmt=<str>      - Format of the parent (must be vpc)",
    "  backing_file=<str>     - Parent image of a differencing VHDX (diskimg extension)",
    "  backing_fmt=<str>      - Format of the parent image (must be vhdx)",
];

/// `create -o help` and `convert -O FMT -o help`, with and without a target file, list
/// exactly qemu-img's lines (format options alone with qemu's protocol note, or merged
/// with the file protocol's `extent_size_hint`, `nocow`, `preallocation`), in the same
/// order, plus only our documented extensions.
#[test]
fn option_help_lists_qemus_options() {
    for fmt in FORMATS {
        for args in [
            vec!["create", "-f", fmt, "-o", "help"],
            vec!["create", "-f", fmt, "-o", "help", "x.img"],
            vec!["convert", "-O", fmt, "-o", "help"],
            vec!["convert", "-O", fmt, "-o", "help", "a.img", "x.img"],
        ] {
            let ours = diskimg_ok(&args);
            let theirs = qemu_img_ok(&args);
            let kept: Vec<&str> = ours.lines().filter(|l| !EXTENSIONS.contains(l)).collect();
            assert_eq!(kept, theirs.lines().collect::<Vec<_>>(), "{args:?}");
        }
    }
}

/// The file protocol's host hints are accepted (and validated) for every format, as by
/// qemu-img; the images are valid.
#[test]
fn host_hint_options_accepted_like_qemu() {
    let dir = tempdir();
    for fmt in FORMATS {
        for (i, opts) in [
            "nocow=on,extent_size_hint=1M",
            "nocow=off,extent_size_hint=0",
            "nocow=maybe",
            "extent_size_hint=5G",
            "extent_size_hint=x",
            "preallocation=falloc",
            "preallocation=metadata",
            "preallocation=bogus",
        ]
        .iter()
        .enumerate()
        {
            let (p, q) = (
                dir.path().join(format!("d{i}.{fmt}")),
                dir.path().join(format!("q{i}.{fmt}")),
            );
            let o = diskimg(&["create", "-q", "-f", fmt, "-o", opts, s(&p), "4M"]);
            let e = qemu_img(&["create", "-q", "-f", fmt, "-o", opts, s(&q), "4M"]);
            assert_eq!(
                o.status.code(),
                e.status.code(),
                "{fmt} {opts}: {o:?} {e:?}"
            );
            // The same error message after the tool and file name.
            let msg = |b: &[u8], tool: &str, f: &std::path::Path| {
                let t = String::from_utf8_lossy(b).into_owned();
                let first = t.lines().next().unwrap_or("").to_string();
                first
                    .replace(&format!("{tool}: {}: ", s(f)), "")
                    .replace(&format!("{tool}: "), "")
            };
            assert_eq!(
                msg(&o.stderr, "diskimg", &p),
                msg(&e.stderr, "qemu-img", &q),
                "{fmt} {opts}"
            );
            if o.status.success() {
                assert_eq!(
                    qemu_info_json(&p, fmt)["virtual-size"],
                    qemu_info_json(&q, fmt)["virtual-size"],
                    "{fmt} {opts}"
                );
            }
        }
    }
}

/// New qcow2 images are byte-identical to qemu-img's for every combination of these
/// options (header, feature table — left out by qemu below 8 KiB clusters —, refcount
/// structures, and an L1 table written only as long as it is, so equal file lengths).
#[test]
fn qcow2_create_is_byte_identical_to_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "10M"]);
    let backing = format!("backing_file={},backing_fmt=qcow2", s(&base));
    let mut checked = 0;
    for size in ["0", "1M", "100M", "5G"] {
        for cs in ["512", "4k", "8k", "64k", "2M"] {
            for extra in [
                "",
                ",compat=0.10",
                ",lazy_refcounts=on",
                ",extended_l2=on",
                ",refcount_bits=1",
                ",compression_type=zstd",
                &format!(",{backing}"),
            ] {
                let opts = format!("cluster_size={cs}{extra}");
                let (q, o) = (d.join("q.qcow2"), d.join("o.qcow2"));
                let _ = std::fs::remove_file(&q);
                let _ = std::fs::remove_file(&o);
                let qo = qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&q), size]);
                let oo = diskimg(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&o), size]);
                assert_eq!(
                    oo.status.code(),
                    qo.status.code(),
                    "{opts} {size}: {}",
                    String::from_utf8_lossy(&oo.stderr)
                );
                if qo.status.success() {
                    let (a, b) = (std::fs::read(&o).unwrap(), std::fs::read(&q).unwrap());
                    assert!(a == b, "{opts} {size}: {} vs {} bytes", a.len(), b.len());
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100, "{checked}");
}
