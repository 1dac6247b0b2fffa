//! Memory bounded by the file, not by what its tables claim (issue 15.9): a qcow2 of a
//! few hundred KiB whose L1 entries all name one full L2 table "allocates" hundreds of
//! GiB. `check`, `check -r all` and `map` run under an address-space limit (`prlimit
//! --as`) far below what a list of those clusters would take; qemu-img judges the
//! results on a smaller claim.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use diskimg_testutil::{qemu_img_ok, qemu_io, tempdir};
use serde_json::Value;

use crate::{code, s};

/// The address-space limit the CLI runs under: a few times its own footprint, far
/// below the hundreds of MiB a per-cluster list of the claims below takes.
const AS_LIMIT: u64 = 64 << 20;

fn be64(img: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(img[at..at + 8].try_into().unwrap())
}

/// A qcow2 (64 KiB clusters) whose first `l1_entries` L1 entries all name the same L2
/// table, every entry of which names one of `data_clusters` data clusters in turn (one
/// cluster: nothing merges in `map`; several: runs of contiguous clusters do).
fn hostile(dir: &Path, name: &str, l1_entries: usize, data_clusters: u64) -> PathBuf {
    let p = dir.join(name);
    let size = format!("{}M", l1_entries * 512);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p), &size]);
    let writes: Vec<String> = (0..data_clusters)
        .map(|i| format!("write -P {} {}k 64k", i + 1, i * 64))
        .collect();
    let cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&p, "qcow2", &cmds);
    let mut img = std::fs::read(&p).unwrap();
    let l1 = be64(&img, 40) as usize;
    let l1e = be64(&img, l1);
    let l2 = (l1e & 0x00ff_ffff_ffff_fe00) as usize;
    let first = be64(&img, l2);
    for k in 0..8192u64 {
        let e = first + (k % data_clusters) * 65536;
        img[l2 + 8 * k as usize..][..8].copy_from_slice(&e.to_be_bytes());
    }
    for i in 0..l1_entries {
        img[l1 + 8 * i..][..8].copy_from_slice(&l1e.to_be_bytes());
    }
    std::fs::write(&p, &img).unwrap();
    p
}

/// The diskimg binary under `prlimit --as=AS_LIMIT`.
fn limited(args: &[&str]) -> Command {
    let mut c = Command::new("prlimit");
    c.arg(format!("--as={AS_LIMIT}"))
        .arg(env!("CARGO_BIN_EXE_diskimg"))
        .args(args);
    c
}

fn run_limited(args: &[&str]) -> Output {
    limited(args).output().expect("run prlimit (util-linux)")
}

/// `check` JSON without the file name.
fn check_json(o: &Output) -> Value {
    let mut v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("filename");
    }
    v
}

#[test]
fn check_of_a_huge_claim_stays_small() {
    let dir = tempdir();
    // 512 L1 entries × 8192 L2 entries: 4 Mi clusters (256 GiB) in a 384 KiB file.
    let p = hostile(dir.path(), "claim.qcow2", 512, 1);
    assert!(std::fs::metadata(&p).unwrap().len() < 1 << 20);
    let o = run_limited(&["check", "--output=json", s(&p)]);
    assert_eq!(code(&o), 2, "{}", String::from_utf8_lossy(&o.stderr));
    let v = check_json(&o);
    assert_eq!(v["allocated-clusters"], 4 << 20);
    // Every reference past the 16-bit refcount maximum is an overflow corruption, the
    // two clusters with too few refcounts (the L2 table, the data cluster) two more;
    // the messages are capped.
    let overflows = 512u64 * 8192 - 65535;
    assert_eq!(v["corruptions"], overflows + 2, "{v}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("further messages not shown"), "{err:.300}");
    assert!(err.lines().count() < 25_000);
    // `-r all` too: the refcounts it can store are fixed, the flags follow them.
    let o = run_limited(&["check", "-r", "all", "--output=json", s(&p)]);
    assert_eq!(code(&o), 2, "{}", String::from_utf8_lossy(&o.stderr));
    let v = check_json(&o);
    assert_eq!(v["corruptions-fixed"], 2 + 512 + 8192, "{v}");
    // What remains are the overflows, which no repair can fix (qemu: "Use qemu-img
    // amend …").
    assert_eq!(v["corruptions"], overflows, "{v}");
}

#[test]
fn check_counts_like_qemu_on_a_smaller_claim() {
    // 16 × 8192 references to one data cluster: 65537 of them overflow. qemu-img (which
    // prints two lines per overflow) gives the same report and exit code, repairs
    // included, on its own copy.
    let dir = tempdir();
    let src = hostile(dir.path(), "small.qcow2", 16, 1);
    for r in [None, Some("leaks"), Some("all")] {
        let run = |tool: &str, name: &str| {
            let p = dir.path().join(name);
            std::fs::copy(&src, &p).unwrap();
            let mut a = vec!["check", "--output=json"];
            if let Some(r) = r {
                a.extend(["-r", r]);
            }
            a.push(s(&p));
            let o = Command::new(tool)
                .args(&a)
                .stderr(Stdio::null())
                .output()
                .unwrap();
            (check_json(&o), code(&o))
        };
        let q = run("qemu-img", "q.qcow2");
        assert_eq!(q.1, 2, "{r:?} {q:?}");
        assert_eq!(run(env!("CARGO_BIN_EXE_diskimg"), "d.qcow2"), q, "{r:?}");
    }
}

#[test]
fn map_streams_a_huge_claim() {
    let dir = tempdir();
    // 64 × 8192 clusters that are all the same host cluster: nothing merges, so map
    // prints half a million entries. Its memory must not grow with them.
    let p = hostile(dir.path(), "map.qcow2", 64, 1);
    let mut child = limited(&["map", "--output=json", s(&p)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run prlimit (util-linux)");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut n = 0u64;
    let mut last = String::new();
    for line in out.lines() {
        let line = line.unwrap();
        if n == 0 {
            assert!(
                line.starts_with("[{ \"start\": 0, \"length\": 65536,"),
                "{line}"
            );
        }
        n += 1;
        last = line;
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(n, 64 * 8192);
    assert!(last.ends_with(", \"offset\": 327680}]"), "{last}");
    // Human output too.
    let o = run_limited(&["map", s(&p)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        o.stdout.iter().filter(|&&b| b == b'\n').count(),
        64 * 8192 + 1
    );
}

#[test]
fn map_merges_like_qemu() {
    // Runs of five contiguous clusters merge, the jumps back do not: qemu-img's output,
    // byte for byte, in both formats and for a window.
    let dir = tempdir();
    let p = hostile(dir.path(), "merge.qcow2", 4, 5);
    for args in [
        vec!["map", "--output=json"],
        vec!["map"],
        vec![
            "map",
            "--output=json",
            "--start-offset=100k",
            "--max-length=1000M",
        ],
    ] {
        let mut a = args.clone();
        a.push(s(&p));
        let ours = crate::diskimg_ok(&a);
        let q = qemu_img_ok(&a);
        assert_eq!(ours, q, "{args:?}");
    }
}
