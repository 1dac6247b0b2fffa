//! Every verb's message when its image does not open — a missing file, the wrong `-f`,
//! `json:` names of a missing file, of the wrong format and malformed ones — is
//! qemu-img's, byte for byte: diskimg installed as `qemu-img` (a symlink) and the real
//! qemu-img run the same command line in the same directory. Creating verbs refuse a
//! `json:` target as qemu does (`Unknown protocol 'json'`) instead of creating a file of
//! that name. A name with a protocol prefix (`foo:bar`, a colon before any `/`) names a
//! protocol, even when a file of that name exists (`Unknown protocol 'foo'`), and
//! `file:foo:bar` the file `./foo:bar` (`open_protocols.rs` has the names that open).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diskimg_testutil::{qemu_create, qemu_img_ok, tempdir};

use crate::s;

/// A `qemu-img` symlink to the diskimg binary in `dir/bin`.
pub(crate) fn as_qemu_img(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_diskimg"), &link).unwrap();
    link
}

/// The verbs, `FILE` standing for the image that does not open.
const VERBS: &[&str] = &[
    "info FILE",
    "check FILE",
    "map FILE",
    "measure -O qcow2 FILE",
    "snapshot -l FILE",
    "snapshot -c s FILE",
    "resize FILE 2M",
    "amend -o compat=1.1 FILE",
    "commit FILE",
    "compare FILE ok.qcow2",
    "compare ok.qcow2 FILE",
    "convert -O raw FILE out.raw",
    "convert -p -O raw FILE out.raw",
    "rebase -u -b ok.qcow2 -F qcow2 FILE",
    "rebase -b ok.qcow2 -F qcow2 FILE",
    "bitmap --add FILE b0",
    "bitmap --remove FILE b0",
    "bitmap --merge b0 -b FILE ok.qcow2 b1",
    "dd if=FILE of=out.raw",
    "create -f qcow2 -b FILE -F qcow2 new.qcow2",
];

/// (case, `-f` given, the image argument).
const CASES: &[(&str, &str, &str)] = &[
    ("missing", "", "nope.qcow2"),
    ("wrong format", "qcow2", "ok.raw"),
    (
        "json: of a missing file",
        "",
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"nope"}}"#,
    ),
    (
        "json: of the wrong format",
        "",
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"ok.raw"}}"#,
    ),
    ("json: keyword", "", "json:{broken"),
    ("json: premature end", "", r#"json:{"driver":"qcow2""#),
    ("json: missing value", "", r#"json:{"driver":}"#),
    ("json: stray character", "", r#"json:{"driver":@}"#),
    ("json: no separator", "", r#"json:{"a":1 "b":2}"#),
    ("json: key", "", "json:{1:2}"),
    ("json: two values", "", r#"json:{"a":1}{}"#),
    ("json: empty", "", "json:"),
    ("json: not an object", "", "json:[1]"),
    ("unknown protocol", "", "foo:bar"),
    // A file of that name exists: the name is a protocol's all the same.
    ("unknown protocol, file exists", "", "foo:ok.qcow2"),
    ("unknown protocol before a slash", "", "a:b/c"),
    ("empty protocol", "", ":bar"),
    ("format name as protocol", "", "qcow2:ok.qcow2"),
    ("file: of a protocol-like missing name", "", "file:foo:bar"),
];

pub(crate) fn run(prog: &Path, dir: &Path, args: &[String]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// The files of `dir` (but `bin`), sorted.
pub(crate) fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "bin")
        .collect();
    v.sort();
    v
}

#[test]
fn open_failures_like_qemu_img() {
    let tmp = tempdir();
    let dir = tmp.path();
    let ours = as_qemu_img(dir);
    qemu_create(dir.join("ok.qcow2"), "qcow2", "", Some("1M"));
    qemu_create(dir.join("ok.raw"), "raw", "", Some("1M"));
    // The merge target's bitmap exists: the source is what fails.
    qemu_img_ok(&["bitmap", "--add", s(&dir.join("ok.qcow2")), "b1"]);
    qemu_create(dir.join("foo:ok.qcow2"), "qcow2", "", Some("1M"));
    let files = listing(dir);
    let mut differ = Vec::new();
    for (case, fmt, image) in CASES {
        for verb in VERBS {
            let mut words = verb.split(' ');
            let mut args: Vec<String> = vec![words.next().unwrap().to_string()];
            if !fmt.is_empty() {
                args.extend(["-f".to_string(), (*fmt).to_string()]);
            }
            args.extend(words.map(|w| match w {
                "FILE" => (*image).to_string(),
                w if w.contains("FILE") => w.replace("FILE", image),
                w => w.to_string(),
            }));
            let d = run(&ours, dir, &args);
            let left = listing(dir);
            let q = run(Path::new("qemu-img"), dir, &args);
            assert_eq!(left, listing(dir), "{case}: {args:?} created other files");
            for f in &left {
                if !files.contains(f) {
                    std::fs::remove_file(dir.join(f)).unwrap();
                }
            }
            // (`compare -f qcow2 ok.qcow2 ok.raw` opens both: the outputs are what count.)
            differ.extend(mismatch(&format!("{case}: {args:?}"), &d, &q));
        }
    }
    assert_none_differ(&differ);
}

/// `what` with both tools' exit codes and output when diskimg's stdout, stderr or exit
/// code differ from qemu-img's, else `None`.
pub(crate) fn mismatch(what: &str, d: &Output, q: &Output) -> Option<String> {
    let same = (&d.stdout, &d.stderr, d.status.code()) == (&q.stdout, &q.stderr, q.status.code());
    (!same).then(|| {
        format!(
            "{what}\n  diskimg ({:?}): {}{}\n  qemu-img ({:?}): {}{}",
            d.status.code(),
            String::from_utf8_lossy(&d.stdout),
            String::from_utf8_lossy(&d.stderr),
            q.status.code(),
            String::from_utf8_lossy(&q.stdout),
            String::from_utf8_lossy(&q.stderr),
        )
    })
}

/// Fails listing every mismatch ([`mismatch`]) found.
pub(crate) fn assert_none_differ(differ: &[String]) {
    assert!(
        differ.is_empty(),
        "{} differ:\n{}",
        differ.len(),
        differ.join("\n")
    );
}

#[test]
fn json_targets_are_refused_like_qemu_img() {
    let tmp = tempdir();
    let dir = tmp.path();
    let ours = as_qemu_img(dir);
    qemu_create(dir.join("ok.raw"), "raw", "", Some("1M"));
    let name = r#"json:{"driver":"raw","file":{"driver":"file","filename":"new.raw"}}"#;
    let of = format!("of={name}");
    for args in [
        vec!["create", "-f", "raw", name, "1M"],
        vec!["convert", "-O", "raw", "ok.raw", name],
        vec!["dd", "if=ok.raw", &of, "-O", "raw"],
    ] {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let d = run(&ours, dir, &args);
        let q = run(Path::new("qemu-img"), dir, &args);
        assert_eq!(listing(dir), ["ok.raw"], "{args:?}");
        assert_eq!(
            (String::from_utf8_lossy(&d.stderr), d.status.code()),
            (String::from_utf8_lossy(&q.stderr), q.status.code()),
            "{args:?}"
        );
        assert!(String::from_utf8_lossy(&q.stderr).contains("Unknown protocol 'json'"));
    }
}
