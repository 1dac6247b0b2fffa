//! qcow2 extended L2 (subclusters) as qemu lays it out (iotest 271): each scenario runs
//! with qemu-img/qemu-io and with diskimg on fresh files, and the L2 entries (host
//! offsets and subcluster bitmaps), the messages and `map` must be equal.

use diskimg_testutil::qemu_img_ok;

use crate::iotest_cases::{img_tool, io_calls, outputs_as_qemu, v};
use crate::s;

/// The L2 table of a new 64 KiB-cluster image with a 1 MiB-or-so disk.
const L2: u64 = 0x40000;

/// L2 entries `range` of the table at `l2` (entry and bitmap, as iotest 271 prints them).
fn entries(t: &str, l2: u64, range: std::ops::Range<u64>) -> String {
    let b = std::fs::read(t).unwrap();
    let word = |o: u64| {
        let o = usize::try_from(o).unwrap();
        u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
    };
    range
        .map(|i| {
            format!(
                "#{i}: {:#018x} {:016x}\n",
                word(l2 + i * 16),
                word(l2 + i * 16 + 8)
            )
        })
        .collect()
}

/// An extended-L2 image `t.qcow2` of `size` in `d` (with `opts` added).
fn ext_img(d: &std::path::Path, size: &str, opts: &str) -> String {
    let t = s(&d.join("t.qcow2")).to_string();
    let o = format!("extended_l2=on{opts}");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &o, &t, size]);
    t
}

/// One qemu-io call per command list, each in writeback mode (as the harness runs).
fn io(d: &std::path::Path, qemu: bool, t: &str, cmds: &[&str]) -> String {
    let mut a = vec!["-t", "writeback"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(t);
    io_calls(d, &[v(&a)], qemu).join("")
}

/// A zero write over compressed clusters that falls back to data over several clusters
/// allocates them as one contiguous run, reusing what the head's copy-on-write freed
/// (iotest 271 "Zero + unmap 1/2", backing file: yes).
#[test]
fn zero_fallback_over_compressed_clusters_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let base = s(&d.join("t.base")).to_string();
        qemu_img_ok(&["create", "-q", "-f", "raw", &base, "2083k"]);
        crate::qemu_io_raw(&["-f", "raw", "-c", "write -q -P 0xff 0 2083k", &base]);
        let t = s(&d.join("t.qcow2")).to_string();
        let o = "extended_l2=on";
        qemu_img_ok(&[
            "create", "-q", "-f", "qcow2", "-o", o, "-b", &base, "-F", "raw", &t, "2083k",
        ]);
        let mut cmds: Vec<String> = vec![
            "write -q -P 1 576k 576k".into(),
            "write -q -z -u 576k 192k".into(),
            "write -q -z -u 800k 128k".into(),
            "write -q -z -u 991k 128k".into(),
        ];
        cmds.extend((18..29u64).map(|c| format!("write -q -c -P {} {}k 64k", c, c * 64)));
        cmds.extend(
            ["1152k 192k", "1376k 128k", "1567k 129k", "1759k 128k"]
                .map(|r| format!("write -q -z -u {r}")),
        );
        let mut out: Vec<String> = cmds.iter().map(|c| io(d, qemu, &t, &[c])).collect();
        out.push(entries(&t, L2, 9..30));
        out.push(qemu_img_ok(&["check", &t]));
        out
    };
    let q = outputs_as_qemu(run);
    assert!(q[19].contains("#25: 0x80000000000e0000"), "{q:?}");
}

/// Copy-on-write of extended-L2 clusters shared with a snapshot copies only qemu's
/// span (first to last allocated subcluster), and zero writes on such clusters change
/// their bits in place (iotest 271 "Test copy-on-write on an image with snapshots").
#[test]
fn snapshot_copy_on_write_of_subclusters_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let t = ext_img(d, "1M", "");
        for c in 0..10u64 {
            let cmds = [
                format!("write -q -z {}k 2k", 64 * c + 14),
                format!("write -q -P {} {}k 2k", 0xd0 + c, 64 * c + 26),
                format!("write -q -P {} {}k 2k", 0xe0 + c, 64 * c + 36),
            ];
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            io(d, qemu, &t, &cmds);
        }
        let r = img_tool(qemu, &["snapshot", "-c", "snap1", &t]);
        assert!(r.status.success(), "{r:?}");
        let out = io(
            d,
            qemu,
            &t,
            &[
                "write -q -P 0xf0 30k 1k",
                "write -q -P 0xf1 84k 1k",
                "write -q -P 0xf2 168k 1k",
                "write -q -P 0xf3 218k 1k",
                "write -q -P 0xf4 270k 1k",
                "write -q -P 0xf5 321k 1k",
                "write -q -z 414k 3k",
                "write -q -z 474k 2k",
                "write -q -z 538k 1k",
                "write -q -z 588k 1k",
            ],
        );
        vec![
            out,
            entries(&t, 0x110000, 0..10),
            qemu_img_ok(&["check", &t]),
        ]
    };
    let q = outputs_as_qemu(run);
    assert!(
        q[1].contains("#0: 0x8000000000120000 000000800007e000"),
        "{q:?}"
    );
}

/// Reads and writes meeting invalid extended L2 entries fail with EIO and print qemu's
/// "Marking image as corrupt" line (its read path words it with two spaces); `check -r
/// all` of an unaligned data cluster counts one corruption fixed, one left.
#[test]
fn invalid_entries_marked_corrupt_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let mut out = Vec::new();
        for cmd in ["read", "write"] {
            let t = ext_img(d, "1M", "");
            io(d, qemu, &t, &["write -q 256k 1k"]);
            // Cluster #1: both the 'zero' and the 'allocated' bit of subcluster #0.
            let mut b = std::fs::read(&t).unwrap();
            let at = usize::try_from(L2 + 24).unwrap();
            b[at..at + 8].copy_from_slice(&((1u64 << 32) | 1).to_be_bytes());
            std::fs::write(&t, b).unwrap();
            out.push(io(d, qemu, &t, &[&format!("{cmd} 0 192k")]));
            out.push(entries(&t, L2, 0..2));
        }
        let base = s(&d.join("t.base")).to_string();
        qemu_img_ok(&["create", "-q", "-f", "raw", &base, "128k"]);
        let t = s(&d.join("u.qcow2")).to_string();
        let o = "extended_l2=on";
        qemu_img_ok(&[
            "create", "-q", "-f", "qcow2", "-o", o, "-b", &base, "-F", "raw", &t,
        ]);
        io(d, qemu, &t, &["write -q -P 1 4k 2k"]);
        let mut b = std::fs::read(&t).unwrap();
        b[usize::try_from(L2 + 6).unwrap()] = 2;
        std::fs::write(&t, b).unwrap();
        let c = img_tool(qemu, &["check", "-r", "all", &t]);
        out.push(format!(
            "{:?} {}",
            c.status.code(),
            String::from_utf8_lossy(&c.stdout)
        ));
        out.push(io(d, qemu, &t, &["read -q 0 2k"]));
        out.into_iter().map(|x| x.replace(s(d), "DIR")).collect()
    };
    let q = outputs_as_qemu(run);
    assert!(q[0].contains("Invalid cluster entry found  (L2"), "{q:?}");
    assert!(q[2].contains("Invalid cluster entry found (L2"), "{q:?}");
    assert!(q[4].contains("1 corruptions"), "{q:?}");
}

/// `resize --preallocation` over a backing file preallocates and zeroes the new area; a
/// shrink clears the cut entries with their bitmaps; a rebase writes only the differing
/// subclusters (iotest 271 resize, discard and rebase cases).
#[test]
fn resize_shrink_and_rebase_of_subclusters_as_qemu() {
    let run = |d: &std::path::Path, qemu: bool| -> Vec<String> {
        let mut out = Vec::new();
        let base = s(&d.join("t.base")).to_string();
        qemu_img_ok(&["create", "-q", "-f", "raw", &base, "1M"]);
        crate::qemu_io_raw(&["-f", "raw", "-c", "write -q -P 0xff 0 1M", &base]);
        for mode in ["metadata", "falloc", "full"] {
            let t = s(&d.join(format!("{mode}.qcow2"))).to_string();
            let o = "extended_l2=on";
            qemu_img_ok(&[
                "create", "-q", "-f", "qcow2", "-o", o, "-b", &base, "-F", "raw", &t, "503k",
            ]);
            let r = img_tool(
                qemu,
                &["resize", &format!("--preallocation={mode}"), &t, "1013k"],
            );
            out.push(format!("{:?}", r.status.code()));
            out.push(io(
                d,
                qemu,
                &t,
                &["read -P 0xff 0 503k", "read -P 0 503k 510k"],
            ));
        }
        let t = ext_img(d, "1M", "");
        io(d, qemu, &t, &["write -q 0 128k"]);
        io(d, qemu, &t, &["discard -q 0 128k"]);
        for a in [
            &["resize", "--shrink", t.as_str(), "64k"][..],
            &["resize", t.as_str(), "1M"],
        ] {
            assert!(img_tool(qemu, a).status.success());
        }
        out.push(entries(&t, L2, 0..2));
        // Rebase: the old backing holds two separate subclusters of one 1 MiB cluster.
        let [b, m, top] = ["b", "m", "top"].map(|n| s(&d.join(format!("{n}.qcow2"))).to_string());
        let o = "cluster_size=1M,extended_l2=on";
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", o, &b, "1M"]);
        qemu_img_ok(&[
            "create", "-q", "-f", "qcow2", "-o", o, "-b", &b, "-F", "qcow2", &m,
        ]);
        qemu_img_ok(&[
            "create", "-q", "-f", "qcow2", "-o", o, "-b", &m, "-F", "qcow2", &top,
        ]);
        crate::qemu_io_raw(&[
            "-c",
            "write -P 0x11 32k 32k",
            "-c",
            "write -P 0x22 960k 32k",
            &m,
        ]);
        let r = img_tool(qemu, &["rebase", "-b", &b, "-F", "qcow2", &top]);
        assert!(r.status.success(), "{r:?}");
        let map = img_tool(qemu, &["map", &top]);
        out.push(String::from_utf8_lossy(&map.stdout).replace(s(d), "DIR"));
        out.push(entries(&top, 0x400000, 0..1));
        out
    };
    let q = outputs_as_qemu(run);
    assert_eq!(q[0], "Some(0)", "{q:?}");
    assert!(
        q[6].contains("#1: 0x0000000000000000 0000000000000000"),
        "{q:?}"
    );
    assert!(q[8].contains("0000000040000002"), "{q:?}");
}
