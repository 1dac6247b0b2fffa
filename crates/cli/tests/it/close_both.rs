//! A verb whose operation fails and whose image then fails to close (its qcow2 bitmaps
//! cannot be stored: the base sits on a full size-limited `raw` node) reports both, in
//! qemu-img's order and with its exit code: `bitmap` prints the operation's error, then
//! the close error between the two "Lost persistent bitmaps" lines; `commit` prints the
//! two "Lost" lines, then the operation's error (no "Error while closing").

use diskimg_testutil::qemu_img_ok;

use crate::iotest_close::{node_names, raw_node_json, steps_on_full_node};

/// A 1 GiB qcow2 base with bitmap `b1` whose file ends at its last cluster: the raw node
/// of that size leaves no room for anything new. Returns the node's size.
fn full_base(base: &str) -> u64 {
    qemu_img_ok(&["create", "-q", "-f", "qcow2", base, "1G"]);
    qemu_img_ok(&["bitmap", "--add", base, "b1"]);
    let f = std::fs::OpenOptions::new().write(true).open(base).unwrap();
    let len = f.metadata().unwrap().len().div_ceil(65536) * 65536;
    f.set_len(len).unwrap();
    len
}

/// Runs `steps` with qemu-img and with diskimg on fresh copies of `setup`'s files and
/// asserts the same exit codes, stderr (node names filtered) and resulting base.
fn assert_as_qemu(setup: &dyn Fn(&str, &str) -> u64, steps: &[&[&str]]) -> Vec<String> {
    let q = steps_on_full_node(true, setup, steps);
    let d = steps_on_full_node(false, setup, steps);
    let filtered = |(v, c): &(Vec<(i32, String)>, String)| {
        let v: Vec<(i32, String)> = v.iter().map(|(k, e)| (*k, node_names(e))).collect();
        (v, c.clone())
    };
    assert_eq!(
        filtered(&d),
        filtered(&q),
        "ours (left) differs from qemu-img's"
    );
    q.0.iter().map(|(_, e)| e.clone()).collect()
}

/// `bitmap --add --merge MISSING`: the merge fails, then storing the bitmaps at close.
#[test]
fn bitmap_operation_and_close_failing_as_qemu() {
    let setup = |base: &str, _top: &str| full_base(base);
    let steps: &[&[&str]] = &[&["bitmap", "--add", "--merge", "missing", "{J}", "x"]];
    let err = assert_as_qemu(&setup, steps);
    assert!(err[0].starts_with("qemu-img: Operation merge"), "{err:?}");
    assert!(err[0].contains("Lost persistent bitmaps"), "{err:?}");
}

/// `bitmap --merge MISSING -b SRC`: the source has no such bitmap (the image was
/// opened all the same, and its bitmaps are stored when it closes).
#[test]
fn bitmap_merge_source_and_close_failing_as_qemu() {
    let setup = |base: &str, src: &str| {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", src, "1G"]);
        full_base(base)
    };
    for add in [false, true] {
        let mut step = vec!["bitmap"];
        if add {
            step.extend(["--add", "-g", "512"]);
        }
        step.extend(["--merge", "missing", "-b", "{T}", "{J}", "b1"]);
        if add {
            *step.last_mut().unwrap() = "x";
        }
        let err = assert_as_qemu(&setup, &[&step]);
        assert!(
            err[0].contains("Dirty bitmap 'missing' not found"),
            "{err:?}"
        );
        assert!(err[0].contains("Error while closing the image"), "{err:?}");
    }
}

/// `commit` into the full base: the block job fails, then storing the base's bitmaps.
#[test]
fn commit_job_and_close_failing_as_qemu() {
    let setup = |base: &str, top: &str| {
        let len = full_base(base);
        let json = raw_node_json(base, len);
        crate::qemu_overlay("qcow2", &json, "qcow2", top);
        let io = crate::qemu_io_raw(&["-c", "write 0 1m", top]);
        assert!(io.status.success(), "{io:?}");
        len
    };
    for drop in [true, false] {
        let mut step = vec!["commit"];
        if drop {
            step.push("-d");
        }
        step.push("{T}");
        let err = assert_as_qemu(&setup, &[&step]);
        assert!(err[0].contains("Lost persistent bitmaps"), "{err:?}");
        assert!(
            err[0].ends_with("Block job failed: No space left on device\n"),
            "{err:?}"
        );
    }
}
