//! The hostile-image corpus (issue 19), generated at test time from small qemu-img-made
//! images (nothing large is committed): every CVE image, qemu-iotests' corrupt-image
//! cases (060, 080, 059, 088 style header and table corruptions), loops (backing chains,
//! L2 tables pointing at headers or at the L1 table), huge tables, and references to
//! FIFOs and symbolic links. [`truncations`] and [`Mutator`] add truncations at every
//! structure boundary and bit-flip mutants of each format.
//!
//! [`build`] writes the named cases into a directory; the facade's `tests/it/hostile.rs`
//! runs every verb on them in-process, `crates/cli/tests/it/hostile.rs` runs the binary
//! on them under `prlimit --as=1GiB --cpu=2`.

mod files;
mod mutate;
mod qcow2;
mod vhd;
mod vmdk;

use std::path::{Path, PathBuf};

pub use mutate::{Mutator, Patched, truncations};

/// One hostile image.
#[derive(Clone, Debug)]
pub struct Case {
    /// A short name (also the file name's stem).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// qemu's format name to open it as (`-f`).
    pub format: &'static str,
    /// What it attacks, for messages.
    pub what: &'static str,
    /// True when `inspect` must not call it safe (every named case but the base images).
    pub hostile: bool,
}

/// A base image per format: small, with data, made by qemu-img (format, bytes).
pub fn bases(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let specs: [(&str, &str, &str); 7] = [
        ("qcow2", "", "64M"),
        ("qcow2", "compat=0.10,cluster_size=4096", "16M"),
        ("vmdk", "", "64M"),
        ("vmdk", "subformat=streamOptimized", "16M"),
        ("vpc", "", "64M"),
        ("vhdx", "block_size=1M,log_size=1M", "8M"),
        ("vdi", "", "16M"),
    ];
    let mut out = Vec::new();
    for (i, (fmt, opts, size)) in specs.iter().enumerate() {
        let p = dir.join(format!("base{i}.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let ps = p.to_string_lossy().into_owned();
        args.extend([ps.as_str(), size]);
        crate::qemu_img_ok(&args);
        if !opts.contains("streamOptimized") {
            crate::qemu_io(&p, fmt, &["write -P 0x11 0 64k", "write -P 0x22 1M 128k"]);
        } else {
            let raw = dir.join("so.raw");
            std::fs::write(&raw, crate::pattern(5, 2 << 20)).expect("write raw");
            let rs = raw.to_string_lossy().into_owned();
            let o = ["convert", "-f", "raw", "-O", "vmdk", "-o", opts, &rs, &ps];
            crate::qemu_img_ok(&o);
        }
        out.push((*fmt, std::fs::read(&p).expect("read base")));
    }
    out
}

/// Writes every named hostile case into `dir` and returns them.
pub fn build(dir: &Path) -> Vec<Case> {
    let mut b = Builder {
        dir: dir.to_path_buf(),
        cases: Vec::new(),
    };
    for (i, (fmt, bytes)) in bases(dir).into_iter().enumerate() {
        b.add(
            &format!("base{i}"),
            fmt,
            "an untouched base image",
            false,
            &bytes,
        );
    }
    qcow2::cases(&mut b);
    vmdk::cases(&mut b);
    vhd::cases(&mut b);
    files::cases(&mut b);
    b.cases
}

/// Collects cases.
pub(crate) struct Builder {
    pub(crate) dir: PathBuf,
    pub(crate) cases: Vec<Case>,
}

impl Builder {
    /// Writes `bytes` as case `name`.
    pub(crate) fn add(
        &mut self,
        name: &str,
        format: &'static str,
        what: &'static str,
        hostile: bool,
        bytes: &[u8],
    ) -> PathBuf {
        let path = self.dir.join(format!("{name}.img"));
        std::fs::write(&path, bytes).expect("write case");
        self.note(name, format, what, hostile, path.clone());
        path
    }

    /// Records a case whose file already exists.
    pub(crate) fn note(
        &mut self,
        name: &str,
        format: &'static str,
        what: &'static str,
        hostile: bool,
        path: PathBuf,
    ) {
        self.cases.push(Case {
            name: name.to_string(),
            path,
            format,
            what,
            hostile,
        });
    }

    /// A qemu-img-made image of `fmt` with `opts`, `size`, written once with data.
    pub(crate) fn qemu(&self, name: &str, fmt: &str, opts: &str, size: &str) -> Vec<u8> {
        let p = self.dir.join(format!("{name}.src"));
        let ps = p.to_string_lossy().into_owned();
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([ps.as_str(), size]);
        crate::qemu_img_ok(&args);
        crate::qemu_io(&p, fmt, &["write -P 0x33 0 64k"]);
        let v = std::fs::read(&p).expect("read");
        let _ = std::fs::remove_file(&p);
        v
    }
}

/// Big-endian and little-endian field writers on an image in memory.
pub(crate) trait Poke {
    fn be32(&mut self, off: usize, v: u32);
    fn be64(&mut self, off: usize, v: u64);
    fn le16(&mut self, off: usize, v: u16);
    fn le32(&mut self, off: usize, v: u32);
    fn le64(&mut self, off: usize, v: u64);
    fn be32_at(&self, off: usize) -> u32;
    fn be64_at(&self, off: usize) -> u64;
    fn le32_at(&self, off: usize) -> u32;
    fn le64_at(&self, off: usize) -> u64;
}

impl Poke for Vec<u8> {
    fn be32(&mut self, off: usize, v: u32) {
        self[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn be64(&mut self, off: usize, v: u64) {
        self[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn le16(&mut self, off: usize, v: u16) {
        self[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn le32(&mut self, off: usize, v: u32) {
        self[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn le64(&mut self, off: usize, v: u64) {
        self[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn be32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self[off..off + 4].try_into().unwrap())
    }
    fn be64_at(&self, off: usize) -> u64 {
        u64::from_be_bytes(self[off..off + 8].try_into().unwrap())
    }
    fn le32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self[off..off + 4].try_into().unwrap())
    }
    fn le64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self[off..off + 8].try_into().unwrap())
    }
}
