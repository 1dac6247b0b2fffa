//! `snapshot -c / -d / -a` leave the file qemu-img leaves: the same operations on an
//! image made by qemu-img + qemu-io and on one made by diskimg + `diskimg io` give
//! byte-identical files after every step (snapshot dates aside), and `qemu-img check`
//! says the same of both. This covers the COPIED flags qemu's
//! `qcow2_update_snapshot_refcount` rewrites: in snapshot L1 copies (taken with the
//! active table's flags), in a remaining snapshot's L2 tables after a delete, and in
//! the active tables.

use std::path::Path;

use diskimg_testutil::{qemu_img, qemu_img_ok, qemu_io, tempdir};

use crate::{diskimg_ok, s};

/// One step of a scenario: qemu-io commands, or a `snapshot` option and its argument
/// (with `SnapWith`: on `--image-opts driver=qcow2,OPTIONS,file.filename=…`).
enum Step {
    Io(&'static [&'static str]),
    Snap(&'static str, &'static str),
    SnapWith(&'static str, &'static str, &'static str),
}
use Step::{Io, Snap, SnapWith};

/// qemu's runtime option that keeps the clusters snapshot operations free unpunched.
const KEEP: &str = "pass-discard-snapshot=off";

const FIRST: &[&str] = &[
    "write -P 1 0 256k",
    "write -P 2 1M 64k",
    "write -c -P 3 2M 64k",
    "write -z 3M 64k",
];

/// The scenarios: two snapshots deleted in both orders, a table both snapshots share
/// but the active image no longer does, applying a snapshot, and deleting / applying
/// with `pass-discard-snapshot=off` (the freed clusters keep their old data, as qemu's).
fn scenarios() -> Vec<(&'static str, Vec<Step>)> {
    let two = |first: &'static str, second: &'static str| {
        vec![
            Io(FIRST),
            Snap("-c", "a"),
            Io(&["write -P 4 64k 64k", "write -P 5 3M 64k"]),
            Snap("-c", "b"),
            Io(&["write -P 6 128k 64k", "write -P 7 2M 4k"]),
            Snap("-d", first),
            Io(&["write -P 8 192k 4k"]),
            Snap("-d", second),
        ]
    };
    vec![
        ("delete a then b", two("a", "b")),
        ("delete b then a", two("b", "a")),
        (
            "shared inactive table",
            vec![
                Io(FIRST),
                Snap("-c", "a"),
                Snap("-c", "b"),
                Io(&["write -P 4 0 64k"]),
                Snap("-d", "a"),
                Io(&["write -P 5 64k 4k"]),
                Snap("-c", "c"),
                Snap("-d", "b"),
                Snap("-d", "c"),
            ],
        ),
        (
            "apply",
            vec![
                Io(FIRST),
                Snap("-c", "a"),
                Io(&["write -P 4 0 64k", "write -P 5 1M 4k"]),
                Snap("-c", "b"),
                Io(&["write -P 6 64k 64k"]),
                Snap("-a", "a"),
                Io(&["write -P 7 128k 4k"]),
                Snap("-d", "a"),
                Snap("-a", "b"),
                Snap("-d", "b"),
            ],
        ),
        (
            "pass-discard-snapshot=off",
            vec![
                Io(FIRST),
                Snap("-c", "a"),
                Io(&["write -P 4 0 256k", "write -P 5 1M 64k"]),
                Snap("-c", "b"),
                Io(&["write -P 6 0 128k"]),
                SnapWith("-d", "a", KEEP),
                SnapWith("-a", "b", KEEP),
                Io(&["write -P 7 64k 4k"]),
                SnapWith("-d", "b", KEEP),
            ],
        ),
    ]
}

/// The file with each snapshot entry's date (spec "Snapshot table": bytes 16..24 of
/// an entry) zeroed, the one thing two runs of the same steps cannot share. `dates`
/// gathers where the dates of every table seen so far lie: with
/// `pass-discard-snapshot=off` an old table stays in the file after it is replaced.
fn undated(p: &Path, dates: &mut Vec<usize>) -> Vec<u8> {
    let mut b = std::fs::read(p).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes(b[at..at + 2].try_into().unwrap());
    let n = be32(&b, 60);
    let mut at = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    for _ in 0..n {
        let extra = be32(&b, at + 36) as usize;
        let names = be16(&b, at + 12) as usize + be16(&b, at + 14) as usize;
        dates.push(at + 16);
        at = (at + 40 + extra + names).next_multiple_of(8);
    }
    for &d in dates.iter() {
        if let Some(f) = b.get_mut(d..d + 8) {
            f.fill(0);
        }
    }
    b
}

/// `qemu-img check` of `p`: exit code and output.
fn check(p: &Path) -> (Option<i32>, String, String) {
    let o = qemu_img(&["check", s(p)]);
    let text = |v: &[u8]| String::from_utf8_lossy(v).replace(s(p), "IMG");
    (o.status.code(), text(&o.stdout), text(&o.stderr))
}

/// Runs `steps` on an image of each tool, created with `-o OPTS` (and over a backing
/// file with `backing`), comparing after every step.
fn run(dir: &Path, what: &str, steps: &[Step], opts: &str, backing: bool) {
    let (q, d) = (dir.join("q.qcow2"), dir.join("d.qcow2"));
    let base = dir.join("base.qcow2");
    let mut create = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        create.extend(["-o", opts]);
    }
    if backing {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
        qemu_io(&base, "qcow2", &["write -P 9 0 4M"]);
        create.extend(["-b", s(&base), "-F", "qcow2"]);
    }
    qemu_img_ok(&[create.as_slice(), &[s(&q), "4M"]].concat());
    diskimg_ok(&[create.as_slice(), &[s(&d), "4M"]].concat());
    let mut dates = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Io(cmds) => {
                qemu_io(&q, "qcow2", cmds);
                let mut a = vec!["io", "-f", "qcow2"];
                for c in *cmds {
                    a.extend(["-c", c]);
                }
                a.push(s(&d));
                diskimg_ok(&a);
            }
            Snap(op, name) => {
                qemu_img_ok(&["snapshot", op, name, s(&q)]);
                diskimg_ok(&["snapshot", op, name, s(&d)]);
            }
            SnapWith(op, name, opts) => {
                let spec = |p: &Path| format!("driver=qcow2,{opts},file.filename={}", s(p));
                let (qs, ds) = (spec(&q), spec(&d));
                qemu_img_ok(&["snapshot", op, name, "--image-opts", &qs]);
                diskimg_ok(&["snapshot", op, name, "--image-opts", &ds]);
            }
        }
        let at = format!("{what} (-o '{opts}', backing: {backing}), after step {i}");
        let (a, b) = (undated(&q, &mut dates), undated(&d, &mut dates));
        if a != b {
            let first = a.iter().zip(&b).position(|(x, y)| x != y);
            panic!(
                "{at}: files differ (lengths {} / {}, first difference at {first:#x?})",
                a.len(),
                b.len()
            );
        }
        assert_eq!(check(&q), check(&d), "{at}: qemu-img check");
    }
}

#[test]
fn snapshot_operations_leave_qemus_bytes() {
    let dir = tempdir();
    for (what, steps) in scenarios() {
        // (Not other cluster sizes: qemu compresses the clusters of one multi-cluster
        // `write -c` in parallel tasks, so its own layout of FIRST varies run to run.)
        for (opts, backing) in [
            ("", false),
            ("", true),
            ("extended_l2=on", false),
            ("refcount_bits=8", true),
            ("compat=0.10", false),
        ] {
            run(dir.path(), what, &steps, opts, backing);
        }
    }
}
