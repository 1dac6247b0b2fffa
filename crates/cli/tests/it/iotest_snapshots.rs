//! qcow2 snapshot-table scenarios from qemu-iotests (080, 261, 061), judged by qemu's
//! own programs: one shell script runs once with the real qemu-img/qemu-io and once with
//! diskimg installed as `qemu-img`/`qemu-io` (symlinks first in `PATH`), on images qemu-img
//! made and the script damaged; the combined output (stdout and stderr through one pipe,
//! timing lines dropped) must be the same.

use std::process::Command;

use diskimg_testutil::tempdir;

use crate::s;

/// Runs `script` under `sh` in a fresh directory (`$T` is `DIR/t.qcow2`, `poke OFFSET
/// BYTES` writes printf-escaped bytes into it) with qemu's programs or, with `dropin`,
/// diskimg's symlinks; returns the output with the directory shown as DIR.
fn script_output(script: &str, dropin: bool) -> String {
    let d = tempdir();
    let mut path = std::env::var("PATH").unwrap_or_default();
    if dropin {
        let bin = d.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for name in ["qemu-img", "qemu-io"] {
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_diskimg"), bin.join(name)).unwrap();
        }
        path = format!("{}:{path}", s(&bin));
    }
    let prelude = "poke() { printf \"$2\" | dd of=\"$T\" bs=1 seek=\"$1\" conv=notrunc \
                   status=none; }\n";
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("{prelude}exec 2>&1\n{script}"))
        .env("PATH", path)
        .env("T", d.path().join("t.qcow2"))
        .current_dir(d.path())
        .output()
        .expect("run sh");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.contains(" ops;"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(s(d.path()), "DIR")
}

/// The script's output with qemu and with diskimg, asserted equal; returns qemu's.
fn as_qemu(script: &str) -> String {
    let q = script_output(script, false);
    let d = script_output(script, true);
    assert_eq!(d, q, "script:\n{script}");
    q
}

/// What every command does with a snapshot whose L1 table reference is broken
/// (iotest 080): the image opens, and each use of the snapshot fails in its own words
/// (convert -l, a downgrade expanding the snapshots' zero clusters, writes under the
/// inactive-L2 overlap check, snapshot -a and -d); check reports the table entry.
#[test]
fn snapshot_l1_is_checked_where_used() {
    for (poke, want) in [
        ("poke 458752 '\\0\\0\\0\\0\\0\\100\\2\\0'", "offset invalid"),
        ("poke 458760 '\\20\\0\\0\\0'", "too large"),
    ] {
        let out = as_qemu(&format!(
            "qemu-img create -q -f qcow2 \"$T\" 64M\n\
             qemu-io -c 'write 0 512' \"$T\" >/dev/null\n\
             qemu-img snapshot -c test \"$T\"\n\
             {poke}\n\
             qemu-img info \"$T\" >/dev/null; echo info $?\n\
             qemu-img convert -l test \"$T\" \"$T.snap\"; echo convert $?\n\
             qemu-img amend -o compat=0.10 \"$T\"; echo amend $?\n\
             qemu-io -c 'open -o overlap-check.inactive-l2=on '\"$T\" -c 'write 0 4k'\n\
             qemu-img snapshot -a test \"$T\"; echo apply $?\n\
             qemu-img snapshot -d test \"$T\"; echo delete $?\n\
             qemu-img check \"$T\"; echo check $?\n"
        ));
        assert!(out.contains("info 0"), "{out}");
        assert!(
            out.contains(&format!(
                "Could not delete snapshot 'test': Snapshot L1 table {want}"
            )),
            "{out}"
        );
    }
}

/// The snapshot table header fields (iotest 080): an unaligned table offset is refused
/// even without snapshots; a table beyond the end of the file reads as empty entries,
/// and a full table refuses a new snapshot.
#[test]
fn snapshot_table_header_as_qemu() {
    let out = as_qemu(
        "qemu-img create -q -f qcow2 \"$T\" 64M\n\
         poke 64 '\\22\\64\\126\\170\\220\\253\\315\\357'\n\
         qemu-io -c 'read 0 512' \"$T\"\n\
         qemu-img create -q -f qcow2 \"$T\" 64M\n\
         poke 64 '\\0\\0\\0\\0\\1\\0\\0\\0'\n\
         poke 60 '\\0\\1\\0\\0'\n\
         qemu-img snapshot -c test \"$T\"\n\
         qemu-io -c 'read 0 512' \"$T\"\n",
    );
    assert!(out.contains("Snapshot table offset invalid"), "{out}");
    assert!(
        out.contains("Could not create snapshot 'test': File too large"),
        "{out}"
    );
}

/// L2 entries pointing where no refcount block is (iotest 080): qemu fails taking a
/// snapshot with EFBIG when the refcount table would have to outgrow 8 MiB, and with
/// EAGAIN when only a refcount block is missing.
#[test]
fn snapshot_of_l2_entries_without_refcounts_as_qemu() {
    let out = as_qemu(
        "qemu-img create -q -f qcow2 \"$T\" 64M\n\
         qemu-io -c 'write 0 512' \"$T\" >/dev/null\n\
         poke 262144 '\\277\\377\\377\\377\\377\\377\\0\\0'\n\
         qemu-img snapshot -c test \"$T\"\n\
         poke 262144 '\\200\\0\\0\\377\\377\\377\\0\\0'\n\
         qemu-img snapshot -c test \"$T\"\n",
    );
    assert!(out.contains("Resource temporarily unavailable"), "{out}");
}

/// Amend and resize around snapshots (iotest 061): a v2 image with snapshots refuses a
/// resize in qemu's words; a downgrade expands the zero clusters of the snapshots' own L2
/// tables too (with and without a backing file), leaving an image qemu-img checks clean
/// and whose snapshot reads the same; amending the backing file to what it already is
/// is no change.
#[test]
fn amend_with_snapshots_as_qemu() {
    let out = as_qemu(
        "qemu-img create -q -f qcow2 -o compat=0.10 \"$T\" 32M\n\
         qemu-img snapshot -c foo \"$T\"\n\
         qemu-img resize \"$T\" 64M; echo resize $?\n\
         for b in '' '-b base.qcow2 -F qcow2'; do\n\
         qemu-img create -q -f qcow2 base.qcow2 64M\n\
         qemu-img create -q -f qcow2 -o compat=1.1 $b \"$T\" 64M\n\
         qemu-io -c 'write -P 0x2a 0 128k' -c 'write -z 64k 64k' \"$T\" >/dev/null\n\
         qemu-io -c 'write -z 0 64k' \"$T\" >/dev/null\n\
         qemu-img snapshot -c foo \"$T\"\n\
         qemu-io -c 'write -P 0x11 0 128k' \"$T\" >/dev/null\n\
         qemu-img amend -o compat=0.10 \"$T\"; echo amend $?\n\
         qemu-img check \"$T\"\n\
         qemu-img snapshot -a foo \"$T\"\n\
         qemu-io -c 'read -P 0 0 128k' \"$T\"\n\
         done\n\
         qemu-img rebase -u -b base.qcow2 -F qcow2 \"$T\"\n\
         qemu-img amend -o backing_file=base.qcow2,backing_fmt=qcow2 \"$T\"; echo same $?\n\
         qemu-img amend -o backing_file=base.qcow2 \"$T\"; echo half $?\n",
    );
    assert!(
        out.contains("Can't resize a v2 image which has snapshots"),
        "{out}"
    );
    assert!(out.contains("amend 0") && out.contains("same 0"), "{out}");
}

/// A snapshot table entry with 64 KiB of extra data (iotest 261): the image is refused
/// with qemu's hint, `check` fails with EFBIG, and `check -r all` cuts the extra data to
/// 1024 bytes, rebuilds the refcounts the overlong table broke and writes the table anew.
#[test]
fn snapshot_table_extra_data_repair_as_qemu() {
    let out = as_qemu(
        "qemu-img create -q -f qcow2 \"$T\" 64M\n\
         qemu-img snapshot -c sn0 \"$T\"\n\
         qemu-img snapshot -c sn1 \"$T\"\n\
         off=$(od -An -tu8 --endian=big -j64 -N8 \"$T\" | tr -d ' ')\n\
         second=$((off + 64 + 8))\n\
         poke $((second + 36)) '\\0\\1\\0\\0'\n\
         qemu-img info \"$T\" >/dev/null; echo info $?\n\
         qemu-img check \"$T\"; echo check $?\n\
         qemu-img check -r all \"$T\"; echo repair $?\n\
         qemu-img snapshot -l \"$T\" | sed 's/ 20[0-9-]* [0-9:]* / DATE /'\n",
    );
    assert!(out.contains("force-remove this extra metadata"), "{out}");
    assert!(out.contains("repair 0"), "{out}");
}

/// More than 65536 snapshots (iotest 261): `check` refuses the table with qemu's hint;
/// `check -r all` drops the overhanging ones (and frees what only they used).
#[test]
fn too_many_snapshots_repair_as_qemu() {
    let out = as_qemu(
        "qemu-img create -q -f qcow2 -o compat=0.10 \"$T\" 64M\n\
         poke 64 '\\0\\0\\0\\0\\0\\20\\0\\0'\n\
         poke 60 '\\0\\2\\0\\0'\n\
         truncate -s $((1048576 + 40 * 131072)) \"$T\"\n\
         qemu-img check \"$T\"; echo check $?\n\
         qemu-img check -r all \"$T\" | tail -8; echo repair $?\n\
         qemu-img info \"$T\" | grep -c '^ \\{30\\}'\n",
    );
    assert!(out.contains("65536 overhanging snapshots"), "{out}");
}

/// Extended L2 entries qemu's check judges (iotest 271): a compressed cluster with a
/// subcluster bitmap reads and is overwritten as compressed (the bitmap is unused) and
/// check reports it; an unaligned preallocated cluster without allocated subclusters is
/// repaired into zero subclusters and reads as before.
#[test]
fn extended_l2_entries_checked_as_qemu() {
    let out = as_qemu(
        "qemu-img create -q -f qcow2 -o extended_l2=on \"$T\" 1M\n\
         qemu-io -c 'write -q -P 11 -c 0 64k' \"$T\"\n\
         poke $((262144 + 11)) '\\1\\200'\n\
         qemu-io -c 'read -q -P 11 0 64k' \"$T\"; echo read $?\n\
         qemu-img check \"$T\"; echo check $?\n\
         qemu-io -c 'write -q -P 12 0 64k' \"$T\"; echo write $?\n\
         qemu-img create -q -f raw base.raw 128k\n\
         qemu-io -f raw -c 'write -q -P 0xff 0 128k' base.raw\n\
         qemu-img create -q -f qcow2 -o extended_l2=on -F raw -b base.raw \"$T\"\n\
         qemu-io -c 'write -q -P 1 4k 2k' -c 'write -q -z 4k 2k' \"$T\"\n\
         poke $((262144 + 6)) '\\2'\n\
         qemu-img check -r all \"$T\"; echo repair $?\n\
         qemu-io -c 'read -q -P 0xff 0 4k' -c 'read -q -P 0 4k 2k' \"$T\"\n",
    );
    assert!(out.contains("read 0") && out.contains("repair 0"), "{out}");
    assert!(
        out.contains("non-zero subcluster allocation bitmap"),
        "{out}"
    );
}
