//! compare: same messages and exit codes as qemu-img.

use diskimg_testutil::{qemu_img, tempdir};

use crate::{code, diskimg, qemu_raw, s};

#[test]
fn compare_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let a = qemu_raw(d, "a.raw", "4M", &["write -P 7 1M 64k"]);
    let same = qemu_raw(d, "same.raw", "4M", &["write -P 7 1M 64k"]);
    // Same content, different allocation: explicit zero bytes vs a hole.
    let alloc = qemu_raw(
        d,
        "alloc.raw",
        "4M",
        &["write -P 0 0 1M", "write -P 7 1M 64k"],
    );
    let diff = qemu_raw(
        d,
        "diff.raw",
        "4M",
        &["write -P 7 1M 64k", "write -P 1 2098000 3"],
    );
    let bigger_zero = qemu_raw(d, "bz.raw", "5M", &["write -P 7 1M 64k"]);
    let bigger_data = qemu_raw(
        d,
        "bd.raw",
        "5M",
        &["write -P 7 1M 64k", "write -P 1 4195000 3"],
    );
    let missing = d.join("missing.raw");
    let cases: Vec<(Vec<&str>, &std::path::Path, &std::path::Path)> = vec![
        (vec![], &a, &same),
        (vec!["-f", "raw", "-F", "raw"], &a, &alloc),
        (vec![], &a, &diff),
        (vec![], &diff, &a),
        (vec![], &a, &bigger_zero),
        (vec![], &bigger_data, &a),
        (vec!["-s"], &a, &bigger_zero),
        (vec!["-s"], &a, &same),
        (vec!["-s", "-f", "raw", "-F", "raw"], &a, &alloc),
        (vec!["-s"], &alloc, &a),
        (vec!["-q"], &a, &diff),
        (vec![], &a, &missing),
    ];
    for (opts, x, y) in cases {
        let mut args = vec!["compare"];
        args.extend(&opts);
        args.extend([s(x), s(y)]);
        let ours = diskimg(&args);
        let theirs = qemu_img(&args);
        assert_eq!(code(&ours), theirs.status.code().unwrap(), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "{args:?}"
        );
    }
}
