//! The engines the benchmark compares, behind one small trait.

use std::path::Path;
use std::sync::Arc;

use diskimg::blockio::BlockDevice;
use diskimg::{Format, ImageOptions};
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};

/// One opened image, shared by the benchmark's threads. Errors abort the benchmark.
pub trait Engine: Send + Sync {
    fn read(&self, buf: &mut [u8], off: u64);
    fn write(&self, buf: &[u8], off: u64);
    fn flush(&self);
}

/// True when the row of engine `label` is wanted: `BENCH_ENGINES` (comma-separated
/// prefixes of the labels, e.g. `diskimg,imago` or `diskimg io_uring,qemu-img -d 16`)
/// is unset or names it.
pub fn wanted(label: &str) -> bool {
    let want = std::env::var("BENCH_ENGINES").unwrap_or_default();
    want.is_empty() || want.split(',').any(|w| label.starts_with(w))
}

/// The in-process engines (not `qemu-img bench`), in the order rows are printed,
/// as [`wanted`] selects them: diskimg, imago, then those `BENCH_EXTRA` names
/// (`;`-separated; `diskimg k=v,k2=v2` opens diskimg with those driver options, e.g.
/// `BENCH_EXTRA="diskimg x-write-behind=off"` for an A/B row in the same rounds).
pub fn names() -> Vec<&'static str> {
    let extra = std::env::var("BENCH_EXTRA").unwrap_or_default();
    let extra: &'static str = Box::leak(extra.into_boxed_str());
    ["diskimg", "imago 0.2.6"]
        .into_iter()
        .chain(extra.split(';').filter(|s| !s.is_empty()))
        .filter(|n| wanted(n))
        .collect()
}

/// Opens `path` (qcow2) with engine `name`.
pub fn open_engine(name: &str, path: &Path, write: bool) -> Arc<dyn Engine> {
    match name {
        "diskimg" => {
            let img = diskimg::open(path, Some(Format::Qcow2), &ImageOptions::read_only(!write))
                .expect("diskimg open");
            Arc::new(Diskimg(img.device))
        }
        opts if opts.starts_with("diskimg ") && opts.contains('=') => {
            // Driver options for an A/B row, e.g. `diskimg x-write-behind=off`.
            let mut o = ImageOptions::read_only(!write);
            for kv in opts["diskimg ".len()..].split(',') {
                if let Some((k, v)) = kv.split_once('=') {
                    o.driver_options.set(k, v);
                }
            }
            let img = diskimg::open(path, Some(Format::Qcow2), &o).expect("diskimg open");
            Arc::new(Diskimg(img.device))
        }
        "imago 0.2.6" => {
            let q = Qcow2::<File>::builder_path(path)
                .write(write)
                .open(PermissiveImplicitOpenGate::default())
                .expect("imago open");
            Arc::new(Imago(FormatAccess::new(q)))
        }
        other => panic!("unknown engine {other}"),
    }
}

struct Diskimg(Arc<dyn BlockDevice>);

impl Engine for Diskimg {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read_at(buf, off).expect("diskimg read");
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write_at(buf, off).expect("diskimg write");
    }
    fn flush(&self) {
        self.0.flush().expect("diskimg flush");
    }
}

struct Imago(FormatAccess<File>);

impl Engine for Imago {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read(buf, off).expect("imago read");
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write(buf, off).expect("imago write");
    }
    /// imago's `flush` writes its caches to the storage; `sync` makes them durable
    /// (fdatasync). A guest flush needs both, as `BlockDevice::flush` does.
    fn flush(&self) {
        self.0.flush().expect("imago flush");
        self.0.sync().expect("imago sync");
    }
}
