//! `convert -t`/`-T` cache modes as qemu defines them, seen from the system calls
//! (strace): which flags the files are opened with, and whether the target is flushed
//! or written back. The images are checked with qemu-img.

use std::path::Path;
use std::process::Command;

use diskimg_testutil::{assert_qemu_check_clean, pattern, qemu_compare, tempdir};

use crate::s;

/// What one traced convert did to its target (and source).
#[derive(Debug, Default)]
struct Trace {
    /// Flags of the last `open`/`openat` of the target (the one the conversion writes through).
    target_flags: String,
    /// Flags of the last `open`/`openat` of the source.
    source_flags: String,
    /// `fdatasync`/`fsync` calls on the target after that open.
    flushes: usize,
    /// `fadvise64` calls on it (write-behind).
    fadvise: usize,
    /// Threads that wrote 1 MiB or more at once to it, and threads that wrote less than
    /// 64 KiB (metadata, small pieces of data).
    big_writers: std::collections::BTreeSet<String>,
    small_writers: std::collections::BTreeSet<String>,
    /// Lengths the target was truncated to (`ftruncate`), in order.
    truncates: Vec<u64>,
}

/// `(thread, length)` of a traced `pwrite64(fd, "…"…, LEN, OFF) = N` (or of its
/// `<unfinished …>` first half).
fn pwrite_len(line: &str, fd: i32) -> Option<(String, u64)> {
    let (tid, call) = line.split_once(' ')?;
    let args = call
        .trim_start()
        .strip_prefix(&format!("pwrite64({fd}, "))?;
    let args = args.split(" <unfinished").next()?.split(") =").next()?;
    let mut it = args.rsplitn(3, ", ");
    let _offset = it.next()?;
    Some((tid.to_string(), it.next()?.trim().parse().ok()?))
}

fn traced_convert(dir: &Path, src: &Path, dst: &Path, args: &[&str]) -> Trace {
    traced_convert_env(dir, src, dst, args, &[])
}

/// [`traced_convert`] with environment variables set for diskimg.
fn traced_convert_env(
    dir: &Path,
    src: &Path,
    dst: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Trace {
    let log = dir.join("strace.log");
    let mut cmd = Command::new("strace");
    cmd.envs(env.iter().copied());
    cmd.args([
        "-f",
        "-o",
        s(&log),
        "-e",
        "trace=open,openat,fdatasync,fsync,fadvise64,pwrite64,ftruncate",
    ]);
    cmd.arg(env!("CARGO_BIN_EXE_diskimg"))
        .arg("convert")
        .args(args);
    let out = cmd
        .args([s(src), s(dst)])
        .output()
        .expect("run strace (install strace)");
    assert!(out.status.success(), "{args:?}: {out:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let mut t = Trace::default();
    let mut fd = None;
    let quoted = |p: &Path| format!("\"{}\"", s(p));
    let opens = |line: &str, p: &Path| {
        (line.contains(" open(") || line.contains(" openat(")) && line.contains(&quoted(p))
    };
    for line in text.lines() {
        if opens(line, src) {
            t.source_flags = line.to_string();
        }
        if opens(line, dst) {
            fd = line
                .rsplit("= ")
                .next()
                .and_then(|v| v.trim().parse::<i32>().ok());
            t.target_flags = line.to_string();
            t.flushes = 0;
            t.fadvise = 0;
            t.big_writers.clear();
            t.small_writers.clear();
            t.truncates.clear();
            continue;
        }
        let Some(fd) = fd else { continue };
        // With several threads strace may split a call: `fdatasync(4 <unfinished ...>`.
        let call = |name: &str| {
            line.contains(&format!(" {name}({fd})"))
                || line.contains(&format!(" {name}({fd} <unfinished"))
        };
        if call("fdatasync") || call("fsync") {
            t.flushes += 1;
        }
        if line.contains(&format!("fadvise64({fd},")) {
            t.fadvise += 1;
        }
        if let Some(rest) = line.split(&format!("ftruncate({fd}, ")).nth(1)
            && let Some(len) = rest.split(')').next().and_then(|v| v.parse().ok())
        {
            t.truncates.push(len);
        }
        match pwrite_len(line, fd) {
            Some((tid, n)) if n >= 1 << 20 => t.big_writers.insert(tid),
            Some((tid, n)) if n < 64 << 10 => t.small_writers.insert(tid),
            _ => false,
        };
    }
    t
}

fn source(dir: &Path) -> std::path::PathBuf {
    // 24 MiB of data in runs long enough to be written back as the copy goes.
    let mut img = vec![0u8; 32 << 20];
    img[1 << 20..25 << 20].copy_from_slice(&pattern(11, 24 << 20));
    img[(30 << 20) + 100..(30 << 20) + 5000].fill(7);
    let p = dir.join("src.raw");
    std::fs::write(&p, &img).unwrap();
    p
}

#[test]
fn target_cache_modes_mean_what_qemu_means() {
    let dir = tempdir();
    let src = source(dir.path());
    for fmt in ["raw", "qcow2"] {
        let dst = dir.path().join(format!("o.{fmt}"));
        let run = |t: &[&str]| {
            let mut args = vec!["-f", "raw", "-O", fmt];
            args.extend(t);
            let tr = traced_convert(dir.path(), &src, &dst, &args);
            assert!(qemu_compare(&src, "raw", &dst, fmt), "{fmt} {t:?}");
            if fmt == "qcow2" {
                assert_qemu_check_clean(&dst, fmt);
            }
            tr
        };
        // Default: durable on return (flushed), written back as it goes, page cache.
        let d = run(&[]);
        assert!(d.flushes >= 1 && d.fadvise >= 1, "{fmt} default: {d:?}");
        assert!(!d.target_flags.contains("O_DIRECT"), "{d:?}");
        // unsafe given explicitly: no flush and no forced write-back at all.
        let u = run(&["-t", "unsafe"]);
        assert_eq!((u.flushes, u.fadvise), (0, 0), "{fmt} unsafe: {u:?}");
        // ... and the file never cut back (XFS writes a file that was cut back out at
        // close): qcow2's reserve grows it in name only.
        assert!(u.truncates.is_sorted(), "{fmt} unsafe: {u:?}");
        // writeback: flushed, nothing forced.
        let w = run(&["-t", "writeback"]);
        assert!(w.flushes >= 1 && w.fadvise == 0, "{fmt} writeback: {w:?}");
        // none: O_DIRECT, flushed.
        let n = run(&["-t", "none"]);
        assert!(n.target_flags.contains("O_DIRECT"), "{n:?}");
        assert!(n.flushes >= 1 && n.fadvise == 0, "{fmt} none: {n:?}");
        assert!(
            !n.big_writers.is_empty() && !n.small_writers.is_empty(),
            "{n:?}"
        );
        if fmt == "qcow2" {
            // The data goes out on write-behind threads, while the ordered writer
            // updates the metadata.
            assert!(n.big_writers.is_disjoint(&n.small_writers), "{n:?}");
        }
        // writethrough / directsync: every write synchronous.
        let wt = run(&["-t", "writethrough"]);
        assert!(wt.target_flags.contains("O_SYNC") && !wt.target_flags.contains("O_DIRECT"));
        let ds = run(&["-t", "directsync"]);
        assert!(ds.target_flags.contains("O_SYNC") && ds.target_flags.contains("O_DIRECT"));
        // The source: page cache by default, O_DIRECT with -T none.
        assert!(!d.source_flags.contains("O_DIRECT"), "{d:?}");
        let tn = run(&["-T", "none", "-t", "none"]);
        assert!(tn.source_flags.contains("O_DIRECT"), "{tn:?}");
        let _ = std::fs::remove_file(&dst);
    }
}

#[test]
fn cache_modes_on_every_format_and_bad_names() {
    let dir = tempdir();
    let src = source(dir.path());
    for fmt in ["vmdk", "vdi", "vhdx", "vpc"] {
        for t in ["none", "directsync", "writethrough", "unsafe"] {
            let out = dir.path().join(format!("o-{t}.{fmt}"));
            crate::diskimg_ok(&["convert", "-t", t, "-T", t, "-O", fmt, s(&src), s(&out)]);
            assert!(qemu_compare(&src, "raw", &out, fmt), "{fmt} -t {t}");
            if fmt != "vpc" {
                assert_qemu_check_clean(&out, fmt);
            }
        }
    }
    let o = crate::diskimg(&["convert", "-T", "bogus", "-O", "raw", s(&src), "x.raw"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "diskimg: Invalid cache option: bogus"
    );
}

/// Sources larger than the dirty limits (forced here with `DISKIMG_CONVERT_DIRECT=1`):
/// the durable default reads a raw source and writes a new image other than raw with
/// `O_DIRECT`, flushed, into the same bytes as through the page cache; `-T`, `-c`, raw
/// targets and formats that only take compressed writes keep the page cache.
#[test]
fn big_default_reads_and_writes_direct() {
    let dir = tempdir();
    let src = source(dir.path());
    let run = |fmt: &str, extra: &[&str], direct: &str| {
        let dst = dir.path().join(format!("o-{direct}.{fmt}"));
        let mut args = vec!["-f", "raw", "-O", fmt];
        args.extend(extra);
        let env = [("DISKIMG_CONVERT_DIRECT", direct)];
        let t = traced_convert_env(dir.path(), &src, &dst, &args, &env);
        assert!(qemu_compare(&src, "raw", &dst, fmt), "{fmt} {extra:?}");
        (t, std::fs::read(&dst).unwrap())
    };
    let (d, bytes) = run("qcow2", &[], "1");
    assert!(d.source_flags.contains("O_DIRECT"), "{d:?}");
    assert!(d.target_flags.contains("O_DIRECT"), "{d:?}");
    assert!(d.flushes >= 1 && d.fadvise == 0, "{d:?}");
    assert_qemu_check_clean(&dir.path().join("o-1.qcow2"), "qcow2");
    let (p, page_cache_bytes) = run("qcow2", &[], "0");
    assert!(!p.source_flags.contains("O_DIRECT") && !p.target_flags.contains("O_DIRECT"));
    assert!(bytes == page_cache_bytes, "the same image either way");
    // -T given: the source as asked; -c: the page cache for the target.
    let (t, _) = run("qcow2", &["-T", "writeback"], "1");
    assert!(!t.source_flags.contains("O_DIRECT") && t.target_flags.contains("O_DIRECT"));
    let (c, _) = run("qcow2", &["-c"], "1");
    assert!(c.source_flags.contains("O_DIRECT") && !c.target_flags.contains("O_DIRECT"));
    // Raw targets and streamOptimized vmdk stay in the page cache.
    let (r, _) = run("raw", &[], "1");
    assert!(
        !r.target_flags.contains("O_DIRECT") && r.flushes >= 1,
        "{r:?}"
    );
    let (v, _) = run("vmdk", &["-o", "subformat=streamOptimized"], "1");
    assert!(!v.target_flags.contains("O_DIRECT"), "{v:?}");
    let (x, _) = run("vhdx", &[], "1");
    assert!(x.target_flags.contains("O_DIRECT"), "{x:?}");
}
