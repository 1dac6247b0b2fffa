//! What the guest test boots: a Debian kernel (fetched with `apt-get download`, unpacked
//! with `dpkg-deb`, cached under `target/tmp`) and an initramfs built here from
//! busybox-static, the kernel's virtio/ext4 modules and the host's `mkfs.ext4`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::serve::{tool, tool_ok};

/// The modules the guest loads (paths under `lib/modules/VERSION/kernel`).
const MODULES: &[&str] = &[
    "drivers/virtio",
    "drivers/block/virtio_blk.ko",
    "fs/ext4",
    "fs/jbd2",
    "fs/mbcache.ko",
    "lib/crc16.ko",
    "lib/libcrc32c.ko",
    "crypto/crc32c_generic.ko",
];

/// A kernel and its modules, unpacked.
pub(crate) struct Kernel {
    pub(crate) vmlinuz: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) version: String,
}

/// The Debian kernel package `linux-image-amd64` points to.
fn kernel_package() -> String {
    let find = || {
        let out = tool("apt-cache", &["depends", "linux-image-amd64"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_string))
            .filter(|p| p.starts_with("linux-image-"))
    };
    if let Some(p) = find() {
        return p;
    }
    tool_ok("apt-get", &["update", "-q"]);
    find().expect("apt-cache knows no linux-image-amd64 (is this Debian?)")
}

/// Fetches (once) and returns the kernel.
pub(crate) fn kernel(cache: &Path) -> Kernel {
    let dir = cache.join("guest-kernel");
    if let Some(k) = unpacked(&dir) {
        return k;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pkg = kernel_package();
    let download = |d: &Path| {
        Command::new("apt-get")
            .args(["download", "-q", &pkg])
            .current_dir(d)
            .output()
            .expect("run apt-get (Debian's apt is needed to fetch the guest kernel)")
    };
    if !download(&dir).status.success() {
        tool_ok("apt-get", &["update", "-q"]);
        let o = download(&dir);
        assert!(
            o.status.success(),
            "apt-get download {pkg}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let deb = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("downloaded .deb");
    let mut wanted = vec!["./boot/vmlinuz-*".to_string()];
    wanted.extend(
        MODULES
            .iter()
            .map(|m| format!("./lib/modules/*/kernel/{m}")),
    );
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards {}",
        deb.display(),
        dir.display(),
        wanted
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    tool_ok("sh", &["-c", &script]);
    std::fs::remove_file(&deb).unwrap();
    unpacked(&dir).expect("kernel unpacked")
}

fn unpacked(dir: &Path) -> Option<Kernel> {
    let boot = std::fs::read_dir(dir.join("boot")).ok()?;
    let vmlinuz = boot.map(|e| e.ok().map(|e| e.path())).find_map(|p| {
        p.filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
    })?;
    let version = vmlinuz
        .file_name()?
        .to_string_lossy()
        .strip_prefix("vmlinuz-")?
        .to_string();
    let root = dir.join("lib/modules").join(&version);
    root.join("kernel/fs/ext4/ext4.ko")
        .exists()
        .then_some(Kernel {
            vmlinuz,
            root,
            version,
        })
}

/// A cpio "newc" archive (the initramfs format) written in memory.
#[derive(Default)]
pub(crate) struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
    pub(crate) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }
    pub(crate) fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data);
    }
    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }
    /// Adds `dir/` and every parent not added yet.
    pub(crate) fn dirs(&mut self, path: &str, seen: &mut Vec<String>) {
        let mut cur = String::new();
        for part in path.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            if !seen.contains(&cur) {
                seen.push(cur.clone());
                self.dir(&cur);
            }
        }
    }
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// Copies a host file (following symlinks) into the archive at the same path.
fn host_file(c: &mut Cpio, seen: &mut Vec<String>, path: &str) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    if let Some(parent) = Path::new(path).parent() {
        c.dirs(&parent.to_string_lossy(), seen);
    }
    c.file(path, 0o755, &data);
}

/// The initramfs: busybox (static), `init`, modules, `mkfs.ext4` with its libraries.
pub(crate) fn initramfs(k: &Kernel, init: &str) -> Vec<u8> {
    let busybox = tool_ok("sh", &["-c", "command -v busybox"])
        .trim()
        .to_string();
    let ldd = tool("ldd", &[&busybox]);
    assert!(
        !ldd.status.success() || String::from_utf8_lossy(&ldd.stdout).contains("not a dynamic"),
        "{busybox} is dynamically linked: install busybox-static"
    );
    let mut c = Cpio::default();
    let mut seen = Vec::new();
    for d in ["/bin", "/dev", "/proc", "/sys", "/mnt", "/etc", "/tmp"] {
        c.dirs(d, &mut seen);
    }
    c.file("/bin/busybox", 0o755, &std::fs::read(&busybox).unwrap());
    c.symlink("/bin/sh", "busybox");
    c.file("/init", 0o755, init.as_bytes());
    let mkfs = "/usr/sbin/mkfs.ext4";
    assert!(
        Path::new(mkfs).exists(),
        "mkfs.ext4 missing: install e2fsprogs"
    );
    host_file(&mut c, &mut seen, mkfs);
    let libs = tool_ok("ldd", &[mkfs]);
    for l in libs.lines() {
        let path = l.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = path {
            host_file(&mut c, &mut seen, p);
        }
    }
    if Path::new("/etc/mke2fs.conf").exists() {
        host_file(&mut c, &mut seen, "/etc/mke2fs.conf");
    }
    let base = format!("/lib/modules/{}", k.version);
    add_tree(&mut c, &mut seen, &k.root, &base);
    c.finish()
}

fn add_tree(c: &mut Cpio, seen: &mut Vec<String>, host: &Path, guest: &str) {
    c.dirs(guest, seen);
    let mut entries: Vec<_> = std::fs::read_dir(host)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = format!("{guest}/{}", p.file_name().unwrap().to_string_lossy());
        if p.is_dir() {
            add_tree(c, seen, &p, &name);
        } else {
            c.file(&name, 0o644, &std::fs::read(&p).unwrap());
        }
    }
}
