//! iotest 061's external data file section: `amend -o data_file=…` and the
//! `data-file.filename` open option of qemu-io's `open -o` and `--image-opts`, judged by
//! qemu: diskimg installed as `qemu-img` and `qemu-io` (symlinks) and the real programs
//! run the same steps in twin directories and must print the same text.

use std::path::{Path, PathBuf};
use std::process::Command;

use diskimg_testutil::tempdir;

use crate::s;

/// `qemu-img` and `qemu-io` symlinks to the diskimg binary in `dir/bin`.
fn dropins(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["qemu-img", "qemu-io"] {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_diskimg"), bin.join(name)).unwrap();
    }
    bin
}

/// Runs every step (`[program, args…]`, `T` in an argument standing for the image's
/// path) in `cwd` with the programs in `bin` (`None`: the installed qemu); stdout and
/// stderr of each, `cwd` shown as DIR and qemu-io's timing line dropped.
fn run_steps(bin: Option<&Path>, cwd: &Path, steps: &[&[&str]]) -> String {
    let image = cwd.join("t.qcow2");
    let mut text = String::new();
    for step in steps {
        let prog = match bin {
            Some(b) => b.join(step[0]),
            None => PathBuf::from(step[0]),
        };
        let args: Vec<String> = step[1..]
            .iter()
            .map(|a| a.replace('T', s(&image)))
            .collect();
        let o = Command::new(&prog)
            .current_dir(cwd)
            .args(&args)
            .output()
            .expect("run");
        let out = format!(
            "{}{}[exit {:?}]\n",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            o.status.code()
        );
        for line in out.replace(s(cwd), "DIR").lines() {
            if !line.contains(" ops; ") && !line.starts_with("disk size") {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

/// iotest 061 "Try changing the external data file": after `amend -o data_file=foo`
/// the open fails naming the stored name ('foo', not a resolved path); the
/// `data-file.filename` option opens the real data file instead (qemu-io `open -o`,
/// `info` and `amend --image-opts`, which shows the plain file name); after
/// `amend -o data_file=` the image needs the option ("'data-file' is required"); and
/// the option is refused for an image without a data file.
#[test]
fn data_file_option_overrides_the_stored_name_as_qemu() {
    let opts = "data-file.filename=T.data,file.filename=T";
    let open = format!("open -o {opts}");
    let steps: &[&[&str]] = &[
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1,data_file=T.data",
            "T",
            "64M",
        ],
        &["qemu-io", "-c", "write -P 7 0 4k", "T"],
        &["qemu-img", "amend", "-o", "data_file=foo", "T"],
        &["qemu-io", "-c", "read -P 7 0 4k", "T"],
        &["qemu-io", "-c", &open, "-c", "read -P 7 0 4k"],
        &["qemu-img", "info", "--image-opts", opts],
        &[
            "qemu-img",
            "amend",
            "-o",
            "data_file=",
            "--image-opts",
            opts,
        ],
        &["qemu-io", "-c", "read 0 4k", "T"],
        &["qemu-io", "-c", &open, "-c", "read -P 7 0 4k"],
        &["qemu-img", "info", "--image-opts", opts],
        &["qemu-img", "create", "-q", "-f", "qcow2", "T", "64M"],
        &["qemu-io", "-c", &open, "-c", "read 0 4k"],
    ];
    let (q, d) = (tempdir(), tempdir());
    let bin = dropins(d.path());
    let qemu = run_steps(None, q.path(), steps);
    let ours = run_steps(Some(&bin), d.path(), steps);
    assert_eq!(ours, qemu);
    assert!(qemu.contains("Could not open 'foo'"), "{qemu}");
    assert!(qemu.contains("'data-file' is required"), "{qemu}");
    assert!(
        qemu.contains("only be set for images with an external"),
        "{qemu}"
    );
}
