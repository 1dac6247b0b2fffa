//! `map` of VPC (VHD) images byte for byte against qemu-img, over a table of sizes (odd
//! CHS-rounded ones, sizes that are not a multiple of 4 KiB, the 4095 MiB qemu limit of
//! the old tools) × states (fresh, written by qemu-io at the start, in the last sector,
//! unaligned in the middle, `write -z`) × creator (qemu-img or diskimg), fixed and
//! dynamic, JSON and human output.
//!
//! A fixed VHD keeps its footer only at the end of the file: qemu-img *probes* it as raw
//! and then maps the footer as the disk's last 512 bytes (the "data" entry after the
//! hole), diskimg probes it as vpc (docs/formats/vhd.md). Both views are checked: with
//! `-f vpc` the two tools agree, and qemu-img's probed map is diskimg's `-f raw` map.

use std::path::Path;

use diskimg_testutil::{qemu_img_ok, qemu_info_json, qemu_io, tempdir};

use crate::{diskimg_ok, s};

/// Sizes given to `create` (virtual sizes are CHS-rounded unless the size is exact).
const SIZES: &[&str] = &["512", "1M", "3333333", "10M", "33M", "4095M"];

/// qemu-io commands for a disk of virtual size `vs`, by state name.
fn state(name: &str, vs: u64) -> Vec<String> {
    let last = vs - 512;
    let mid = vs / 2 / 4096 * 4096 + 1024;
    match name {
        "fresh" => vec![],
        "start" => vec![format!("write -P 1 0 {}", vs.min(64 << 10))],
        "last" => vec![format!("write -P 2 {last} 512")],
        "mid" => vec![format!("write -P 3 {mid} 512")],
        "zero" => vec![
            format!("write -P 1 0 {}", vs.min(1 << 20)),
            "write -z 0 512".into(),
            format!("write -z {last} 512"),
        ],
        _ => unreachable!("{name}"),
    }
}

const STATES: &[&str] = &["fresh", "start", "last", "mid", "zero"];

fn virtual_size(f: &Path) -> u64 {
    qemu_info_json(f, "vpc")["virtual-size"].as_u64().unwrap()
}

/// qemu-img's and diskimg's `map args f`, when they differ.
fn differ(args: &[&str], f: &Path, what: &str) -> Option<String> {
    let mut a = vec!["map"];
    a.extend_from_slice(args);
    a.push(s(f));
    let theirs = qemu_img_ok(&a);
    let ours = diskimg_ok(&a);
    (theirs != ours).then(|| format!("{what} {args:?}:\nqemu-img:\n{theirs}diskimg:\n{ours}"))
}

/// Every size × state × creator of `subformat`; returns the differences.
fn table(subformat: &str) -> Vec<String> {
    let dir = tempdir();
    let mut diffs = Vec::new();
    for (i, size) in SIZES.iter().enumerate() {
        for (j, st) in STATES.iter().enumerate() {
            for by_qemu in [true, false] {
                let f = dir.path().join(format!("m{i}-{j}-{by_qemu}.vhd"));
                let o = format!("subformat={subformat}");
                let args = ["create", "-q", "-f", "vpc", "-o", &o, s(&f), size];
                if by_qemu {
                    qemu_img_ok(&args);
                } else {
                    diskimg_ok(&args);
                }
                let cmds = state(st, virtual_size(&f));
                let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
                if !cmds.is_empty() {
                    qemu_io(&f, "vpc", &cmds);
                }
                let what = format!("{subformat} {size} {st} (made by qemu-img: {by_qemu})");
                for args in [&["-f", "vpc", "--output=json"][..], &["-f", "vpc"]] {
                    diffs.extend(differ(args, &f, &what));
                }
                std::fs::remove_file(&f).ok();
            }
        }
    }
    diffs
}

#[test]
fn fixed_vpc_maps_like_qemu_across_sizes_and_states() {
    let diffs = table("fixed");
    assert!(diffs.is_empty(), "{}\n{}", diffs.len(), diffs.join("\n"));
}

#[test]
fn dynamic_vpc_maps_like_qemu_across_sizes_and_states() {
    let diffs = table("dynamic");
    assert!(diffs.is_empty(), "{}\n{}", diffs.len(), diffs.join("\n"));
}

#[test]
fn probed_fixed_vpc_is_raw_to_qemu_and_vpc_to_diskimg() {
    let dir = tempdir();
    let f = dir.path().join("p.vhd");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&f),
        "10M",
    ]);
    qemu_io(&f, "vpc", &["write -P 1 0 64k"]);
    let info = qemu_img_ok(&["info", "--output=json", s(&f)]);
    assert!(
        info.contains("\"format\": \"raw\""),
        "qemu-img learnt to probe fixed VHDs: docs/formats/vhd.md and this test\n{info}"
    );
    // qemu's probed map: the guest data, the hole, and the footer's 512 bytes as data
    // (its file's last block is allocated); diskimg gives the same map with `-f raw`.
    let theirs = qemu_img_ok(&["map", "--output=json", s(&f)]);
    let footer = format!("\"start\": {}, \"length\": 512", virtual_size(&f));
    assert!(theirs.contains(&footer), "{theirs}");
    assert_eq!(
        theirs,
        diskimg_ok(&["map", "-f", "raw", "--output=json", s(&f)])
    );
    // diskimg's probed map is qemu-img's with `-f vpc`: the footer is not guest data.
    let ours = diskimg_ok(&["map", "--output=json", s(&f)]);
    assert_eq!(
        ours,
        qemu_img_ok(&["map", "-f", "vpc", "--output=json", s(&f)])
    );
    assert!(!ours.contains(&footer), "{ours}");
}
