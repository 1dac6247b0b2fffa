//! Test helpers shared by the diskimg crates (not published).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::disallowed_methods
)]
//!
//! - qemu oracles: [`qemu_img`], [`qemu_img_ok`], [`qemu_create`], [`qemu_io`], [`qemu_read_raw`],
//!   [`qemu_check_json`], [`qemu_compare`], [`qemu_map_json`];
//! - data: [`pattern`], [`read_all`], [`Model`] (an in-memory oracle for write paths),
//!   [`GuestOp`] (a write, zero write or discard, applied here and replayed by qemu-io);
//! - crash tests: [`crash`] cuts a workload at every storage operation and hands each
//!   image a crash can leave to the test ([`crash::sweep`], [`crash::Durable`]);
//! - fixtures: [`corpus_file`] decompresses a sample from the repository's `tests/corpus`;
//!   [`hostile`] generates the hostile-image corpus (CVE images, corrupt tables, loops,
//!   huge tables, FIFOs, symbolic links), truncations and mutants.
//!
//! qemu-img and qemu-io are required: tests that need them panic with a clear message
//! when they are missing (`.ci/run` installs `qemu-utils`), so a missing oracle can never
//! turn into a silently passing test.

pub mod crash;
pub mod epoch;
pub mod hostile;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diskimg_blockio::BlockDevice;

/// A scratch directory removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("could not run {cmd} ({e}); install qemu-utils (apt-get install -y qemu-utils)")
    })
}

/// Runs `qemu-img ARGS`, returning its output whatever the exit code.
pub fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// Runs `qemu-img ARGS`, panicking (with stderr) unless it exits 0; returns stdout.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -q -f FMT [-o OPTS] FILE [SIZE]`: an image made by qemu (no `-o`
/// when `opts` is empty; without `size`, the size of the backing file `opts` names).
pub fn qemu_create(file: impl AsRef<Path>, fmt: &str, opts: &str, size: Option<&str>) -> String {
    let file = file.as_ref().to_string_lossy();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(&file);
    args.extend(size);
    qemu_img_ok(&args)
}

/// `qemu-img create -q -f FMT -b BACKING -F BACKING_FMT FILE [SIZE]`: an overlay made by
/// qemu (without `size`, the backing image's).
pub fn qemu_create_overlay(
    file: impl AsRef<Path>,
    fmt: &str,
    backing: &str,
    backing_fmt: &str,
    size: Option<&str>,
) -> String {
    let file = file.as_ref().to_string_lossy();
    let mut args = vec![
        "create",
        "-q",
        "-f",
        fmt,
        "-b",
        backing,
        "-F",
        backing_fmt,
        &file,
    ];
    args.extend(size);
    qemu_img_ok(&args)
}

/// Runs `qemu-io -f FMT -c CMD… FILE`, panicking unless it succeeds and prints no
/// failure; returns stdout.
pub fn qemu_io(file: &Path, fmt: &str, cmds: &[&str]) -> String {
    let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(file.to_string_lossy().into_owned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &argv);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success()
            && !stdout.contains("failed")
            && !stdout.contains("Pattern verification"),
        "qemu-io {argv:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The guest bytes of `file` as qemu reads them (via `qemu-img convert -O raw`).
pub fn qemu_read_raw(file: &Path, fmt: &str) -> Vec<u8> {
    let dir = tempdir();
    let out = dir.path().join("out.raw");
    qemu_img_ok(&[
        "convert",
        "-U",
        "-f",
        fmt,
        "-O",
        "raw",
        &file.to_string_lossy(),
        &out.to_string_lossy(),
    ]);
    std::fs::read(&out).expect("read converted raw")
}

/// `qemu-img check --output=json`: the parsed report and the exit code.
pub fn qemu_check_json(file: &Path, fmt: &str) -> (serde_json::Value, i32) {
    let out = qemu_img(&[
        "check",
        "-U",
        "--output=json",
        "-f",
        fmt,
        &file.to_string_lossy(),
    ]);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check gave no JSON (exit {code}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, code)
}

/// Asserts `qemu-img check` finds no corruption and no leak.
pub fn assert_qemu_check_clean(file: &Path, fmt: &str) {
    let (v, code) = qemu_check_json(file, fmt);
    assert_eq!(code, 0, "qemu-img check not clean: {v}");
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            v.get(key).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{key}: {v}"
        );
    }
}

/// `qemu-img compare -f FA -F FB A B`: true when identical, false when they differ;
/// panics on errors.
pub fn qemu_compare(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
    let out = qemu_img(&[
        "compare",
        "-U",
        "-f",
        fa,
        "-F",
        fb,
        &a.to_string_lossy(),
        &b.to_string_lossy(),
    ]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        c => panic!(
            "qemu-img compare failed ({c:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `qemu-img map --output=json` parsed.
pub fn qemu_map_json(file: &Path, fmt: &str) -> serde_json::Value {
    let s = qemu_img_ok(&[
        "map",
        "-U",
        "--output=json",
        "-f",
        fmt,
        &file.to_string_lossy(),
    ]);
    serde_json::from_str(&s).expect("map JSON")
}

/// `qemu-img info --output=json` parsed.
pub fn qemu_info_json(file: &Path, fmt: &str) -> serde_json::Value {
    let s = qemu_img_ok(&[
        "info",
        "-U",
        "--output=json",
        "-f",
        fmt,
        &file.to_string_lossy(),
    ]);
    serde_json::from_str(&s).expect("info JSON")
}

/// A small deterministic generator (xorshift64) for workloads: the same seed gives the
/// same sequence. The seed must not be 0.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// The next value reduced below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads a whole device into memory (tests use small virtual sizes).
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let size = usize::try_from(dev.virtual_size()).expect("size fits");
    let mut buf = vec![0u8; size];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(4 << 20);
        dev.read_at(&mut buf[off..off + n], off as u64)
            .expect("read device");
        off += n;
    }
    buf
}

/// The simple model a device must agree with: a byte vector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// The expected guest bytes.
    pub bytes: Vec<u8>,
}

impl Model {
    /// A model of `size` zero bytes.
    pub fn zeroed(size: usize) -> Self {
        Self {
            bytes: vec![0; size],
        }
    }
    /// Applies a write.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        self.bytes[off..off + data.len()].copy_from_slice(data);
    }
    /// Applies write-zeroes (or a discard on a device without backing).
    pub fn zero(&mut self, off: usize, len: usize) {
        self.bytes[off..off + len].fill(0);
    }
}

/// One guest operation a workload applies to our device and replays with qemu-io.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    /// `len` bytes of `byte` at `off` (`write -P BYTE OFF LEN`).
    Write {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
        /// The fill byte.
        byte: u8,
    },
    /// A zero write without unmap (`write -z OFF LEN`).
    Zero {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A discard (`discard OFF LEN`).
    Discard {
        /// Guest offset.
        off: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl GuestOp {
    /// Applies the operation to `dev`, panicking when it fails.
    pub fn apply(self, dev: &dyn BlockDevice) {
        match self {
            Self::Write { off, len, byte } => dev.write_at(&vec![byte; len as usize], off),
            Self::Zero { off, len } => dev.write_zeroes(off, len, Default::default()),
            Self::Discard { off, len } => dev.discard(off, len),
        }
        .unwrap_or_else(|e| panic!("{self:?}: {e}"));
    }

    /// The qemu-io command doing the same.
    pub fn qemu_io(self) -> String {
        match self {
            Self::Write { off, len, byte } => format!("write -P {byte} {off} {len}"),
            Self::Zero { off, len } => format!("write -z {off} {len}"),
            Self::Discard { off, len } => format!("discard {off} {len}"),
        }
    }
}

/// The sample-image corpus that travels with the repository (`tests/corpus` at the
/// workspace root: qemu-iotests' `sample_images`, GPL-2.0 test data, see its MANIFEST.md).
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("tests")
        .join("corpus")
}

/// Decompresses `qemu-sample-images/NAME.bz2` from the corpus into `dir`, returning
/// the path of the decompressed file (in-process, so the suites need no `bzip2` program).
pub fn corpus_file(name: &str, dir: &Path) -> PathBuf {
    use std::io::Read;
    let src = corpus_dir()
        .join("qemu-sample-images")
        .join(format!("{name}.bz2"));
    let file = std::fs::File::open(&src).unwrap_or_else(|e| panic!("open {}: {e}", src.display()));
    let mut data = Vec::new();
    bzip2::read::BzDecoder::new(file)
        .read_to_end(&mut data)
        .unwrap_or_else(|e| panic!("bzip2 -dc {}: {e}", src.display()));
    let dst = dir.join(name);
    std::fs::write(&dst, data).expect("write decompressed corpus file");
    dst
}

/// Opens `bytes` (in memory) read-only with `driver` under a metadata limit of
/// `max_metadata_bytes`, then drops the device: the hostile-bounds tests' open, where a
/// table past the end of the file must come back as corrupt, not as over the limit
/// (which would mean its buffer was sized before its range was checked).
pub fn open_under_limit(
    driver: &dyn diskimg_blockio::Driver,
    bytes: &[u8],
    max_metadata_bytes: u64,
) -> diskimg_blockio::Result<()> {
    use diskimg_blockio::{Limits, MemStorage, OpenOptions, Storage};
    use std::sync::Arc;
    let mut limits = Limits::default();
    limits.max_metadata_bytes = max_metadata_bytes;
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    driver
        .open(s, &OpenOptions::new().read_only(true).limits(limits))
        .map(drop)
}

/// Opens `bytes` with `driver` read-only and exercises it the way a fuzzer should:
/// info, map over the disk, reads of the mapped extents (bounded), and a check.
/// Returns whether the image opened. Any panic inside is the bug being hunted.
pub fn exercise_driver(driver: &dyn diskimg_blockio::Driver, bytes: &[u8]) -> bool {
    use diskimg_blockio::{MemStorage, OpenOptions, RepairMode, Storage};
    use std::sync::Arc;
    let storage: Arc<dyn Storage> = Arc::new(diskimg_blockio::ReadOnlyStorage(
        MemStorage::from_vec(bytes.to_vec()),
    ));
    let _ = driver.probe(storage.as_ref());
    let Ok(dev) = driver.open(storage, &OpenOptions::new().read_only(true)) else {
        return false;
    };
    let _ = dev.info();
    let size = dev.virtual_size();
    let mut pos = 0u64;
    let mut read_budget: u64 = 8 << 20;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        let Ok(e) = dev.map(pos, size - pos) else {
            break;
        };
        if e.len == 0 || e.offset != pos {
            panic!("map returned an empty or misplaced extent: {e:?} at {pos}");
        }
        let n = e.len.min(buf.len() as u64).min(read_budget);
        if n > 0 {
            let _ = dev.read_at(&mut buf[..n as usize], pos);
            read_budget -= n;
        }
        pos = pos.saturating_add(e.len);
    }
    // A read at the very end, and one past it, must not panic.
    if size > 0 {
        let _ = dev.read_at(&mut buf[..1], size - 1);
    }
    let _ = dev.read_at(&mut buf[..1], size);
    let _ = dev.check(RepairMode::None);
    true
}

/// Truncates `image` at every `step` bytes and flips bytes in its first `header_len`
/// bytes, exercising `driver` on each variant: nothing may panic or hang.
pub fn corruption_sweep(
    driver: &dyn diskimg_blockio::Driver,
    image: &[u8],
    step: usize,
    header_len: usize,
) {
    let mut len = 0;
    while len < image.len() {
        exercise_driver(driver, &image[..len]);
        len += step;
    }
    let header_len = header_len.min(image.len());
    for i in 0..header_len {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut v = image.to_vec();
            v[i] ^= flip;
            exercise_driver(driver, &v);
        }
    }
}
