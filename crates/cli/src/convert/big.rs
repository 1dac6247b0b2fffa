//! The durable default for outputs larger than the page cache may hold dirty: written
//! with `O_DIRECT` instead of through the page cache.
//!
//! Why: `convert` without `-t` returns once the image is durable. Through the page
//! cache that means the kernel's dirty throttling while the image is written (past
//! `vm.dirty_ratio` of the memory it can use, every writer waits for write-back) and a
//! final `fdatasync`; writing with `O_DIRECT`, a few large writes in flight and the file
//! grown ahead of them (the path of `-t none`) keeps the device busier with fewer, larger
//! requests. On the big benchmark (8 GiB of data into a qcow2 on XFS over a direct-io
//! loop device, docs/benchmarks.md "Session 9") `-t none` reached durable in less time
//! than the default. Below the dirty limits the page cache is faster (the 4 GiB ext4
//! input: 0.38–0.44 s against 0.44–0.49 s), so the switch needs an output larger than
//! them.
//!
//! The estimate of the output is the sources' allocated bytes (regular files only: for
//! anything else it is unknown and the default stays in the page cache).

use std::os::unix::fs::MetadataExt;

/// True when `convert`'s durable default should write with `O_DIRECT`: the sources
/// (files `srcs`) hold more allocated bytes than the dirty limit of the page cache, or
/// the environment says so (`DISKIMG_CONVERT_DIRECT=1`; `=0` never).
pub(super) fn wanted(srcs: &[String]) -> bool {
    match std::env::var("DISKIMG_CONVERT_DIRECT").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => exceeds_dirty_limit(srcs),
    }
}

/// True when the sources (files `srcs`) hold more allocated bytes than the dirty limit
/// of the page cache.
fn exceeds_dirty_limit(srcs: &[String]) -> bool {
    let Some(limit) = dirty_limit() else {
        return false;
    };
    let mut data = 0u64;
    for s in srcs {
        match std::fs::metadata(s) {
            Ok(m) if m.is_file() => data = data.saturating_add(m.blocks().saturating_mul(512)),
            _ => return false,
        }
    }
    data > limit
}

/// The dirty limit (bytes) past which writers are throttled: `vm.dirty_bytes`, else
/// `vm.dirty_ratio` percent of the memory the kernel counts as dirtyable (free memory
/// and the file cache, as `global_dirtyable_memory` counts it). `None` when unknown.
fn dirty_limit() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let bytes: u64 = read("/proc/sys/vm/dirty_bytes")?.trim().parse().ok()?;
    if bytes > 0 {
        return Some(bytes);
    }
    let ratio: u64 = read("/proc/sys/vm/dirty_ratio")?.trim().parse().ok()?;
    let meminfo = read("/proc/meminfo")?;
    Some(dirtyable(&meminfo)?.saturating_mul(ratio) / 100)
}

/// Free memory and file pages of `/proc/meminfo`, in bytes.
fn dirtyable(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line
            .get(name.len()..)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    let total = field("MemFree:")?
        .saturating_add(field("Active(file):")?)
        .saturating_add(field("Inactive(file):")?);
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirtyable_memory_from_meminfo() {
        let m = "MemTotal: 100 kB\nMemFree:  10 kB\nActive(file):  20 kB\nInactive(file): 30 kB\n";
        assert_eq!(dirtyable(m), Some(60 * 1024));
        assert_eq!(dirtyable("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn small_and_unknown_sources_stay_in_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("small");
        std::fs::write(&f, [1u8; 4096]).unwrap();
        let name = f.to_string_lossy().into_owned();
        assert!(!exceeds_dirty_limit(std::slice::from_ref(&name)));
        // Not a regular file (a directory, a protocol name): unknown.
        let d = dir.path().to_string_lossy().into_owned();
        assert!(!exceeds_dirty_limit(&[name, d]));
        assert!(!exceeds_dirty_limit(&["nbd://127.0.0.1/x".to_string()]));
    }
}
