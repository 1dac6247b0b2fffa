//! Cases made of several files: the CVE images, backing loops and a chain past the depth
//! limit, references to FIFOs and to symbolic links pointing out of the directory.

use std::path::Path;

use super::{Builder, Poke};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A qcow2 file `name.img` in the builder's directory with `-o opts`, `-b`/`-F` as given.
fn qcow2(b: &Builder, name: &str, opts: &str, backing: Option<(&str, &str)>) -> std::path::PathBuf {
    let p = b.dir.join(format!("{name}.img"));
    let ps = s(&p);
    let mut args = vec!["create", "-q", "-f", "qcow2", "-u"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((f, fmt)) = backing {
        args.extend(["-b", f, "-F", fmt]);
    }
    args.extend([ps.as_str(), "16M"]);
    crate::qemu_img_ok(&args);
    p
}

/// Renames the external data file of qcow2 `p` to `name` (the header extension).
fn set_data_file(p: &Path, name: &str) {
    crate::qemu_img_ok(&[
        "amend",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={name}"),
        &s(p),
    ]);
}

pub(super) fn cases(b: &mut Builder) {
    let d = b.dir.clone();
    let note = |b: &mut Builder, name: &str, what: &'static str| {
        let p = b.dir.join(format!("{name}.img"));
        b.note(name, "qcow2", what, true, p);
    };
    qcow2(b, "cve-backing-passwd", "", Some(("/etc/passwd", "raw")));
    note(
        b,
        "cve-backing-passwd",
        "CVE-2024-32498: backing file /etc/passwd",
    );
    let p = qcow2(
        b,
        "cve-data-passwd",
        &format!("data_file={}", s(&d.join("df.raw"))),
        None,
    );
    set_data_file(&p, "/etc/passwd");
    note(
        b,
        "cve-data-passwd",
        "CVE-2024-32498: data file /etc/passwd",
    );
    let json = r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}"#;
    qcow2(b, "cve-backing-json", "", Some((json, "raw")));
    note(
        b,
        "cve-backing-json",
        "CVE-2024-32498: a json: backing name",
    );
    // CVE-2024-40767 / CVE-2026-24708: a raw disk whose first sectors are a qcow2 header
    // with a backing file (opened as raw it is harmless; probed it is not).
    let hdr = std::fs::read(d.join("cve-backing-passwd.img")).expect("read");
    let mut raw = vec![0u8; 4 << 20];
    raw[..65536].copy_from_slice(&hdr[..65536]);
    b.add(
        "cve-raw-with-qcow2",
        "raw",
        "CVE-2024-40767/CVE-2026-24708: qcow2 header in a raw disk",
        true,
        &raw,
    );

    // Backing loops: a file that is its own backing file, and two that back each other.
    qcow2(b, "loop-self", "", Some(("loop-self.img", "qcow2")));
    note(b, "loop-self", "a qcow2 that is its own backing file");
    qcow2(b, "loop-a", "", Some(("loop-b.img", "qcow2")));
    qcow2(b, "loop-b", "", Some(("loop-a.img", "qcow2")));
    note(b, "loop-a", "two qcow2 files backing each other");
    // A chain deeper than the limit (64).
    qcow2(b, "deep-0", "", None);
    for i in 1..=70 {
        qcow2(
            b,
            &format!("deep-{i}"),
            "",
            Some((&format!("deep-{}.img", i - 1), "qcow2")),
        );
    }
    note(b, "deep-70", "a backing chain 70 deep");

    // A FIFO as backing file, data file and extent.
    let fifo = d.join("fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(st.success());
    qcow2(b, "fifo-backing", "", Some(("fifo", "raw")));
    note(b, "fifo-backing", "a FIFO as backing file");
    let p = qcow2(
        b,
        "fifo-data",
        &format!("data_file={}", s(&d.join("df2.raw"))),
        None,
    );
    set_data_file(&p, &s(&fifo));
    note(b, "fifo-data", "a FIFO as data file");
    let desc = "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"fifo\" 0\n";
    b.add(
        "fifo-extent",
        "vmdk",
        "a FIFO as extent",
        true,
        desc.as_bytes(),
    );

    // Names beside the image that are symbolic links to /etc/passwd.
    std::os::unix::fs::symlink("/etc/passwd", d.join("passwd-link")).expect("symlink");
    qcow2(b, "link-backing", "", Some(("passwd-link", "raw")));
    note(
        b,
        "link-backing",
        "a backing file beside the image linking to /etc/passwd",
    );
    let desc = desc.replace("\"fifo\"", "\"passwd-link\"");
    b.add(
        "link-extent",
        "vmdk",
        "an extent beside the image linking to /etc/passwd",
        true,
        desc.as_bytes(),
    );

    // qcow2 data file bit without a name.
    let mut v = std::fs::read(d.join("deep-0.img")).expect("read");
    let incompat = v.be64_at(72);
    v.be64(72, incompat | 4);
    b.add(
        "q-data-bit-no-name",
        "qcow2",
        "the data-file bit without a name",
        true,
        &v,
    );
}
