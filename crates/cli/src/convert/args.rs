//! The command line of `convert` (qemu-img's flags, plus `--bitmaps`, `-t`/`-T` modes
//! and `--target` profiles).

use crate::args::{ForceShareArg, ProgressArg, QuietArg};

/// Arguments of `convert`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Source format (probed when omitted).
    #[arg(short = 'f', long = "source-format")]
    pub(super) format: Option<String>,
    /// Output format (default raw).
    #[arg(short = 'O', default_value = "raw")]
    pub(super) output_format: String,
    /// Output format options (`-o help` lists them); may repeat.
    #[arg(short = 'o')]
    pub(super) options: Vec<String>,
    /// Compress the output (formats with compressed writes).
    #[arg(short = 'c')]
    pub(super) compress: bool,
    /// Copy offloading: data is copied with copy_file_range where the formats allow.
    #[arg(short = 'C', long = "copy-range-offloading")]
    pub(super) copy_range: bool,
    /// Copy the source's persistent dirty bitmaps (qcow2 to qcow2).
    #[arg(long = "bitmaps")]
    pub(super) bitmaps: bool,
    /// With --bitmaps: skip bitmaps marked in-use instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    pub(super) skip_broken_bitmaps: bool,
    #[command(flatten)]
    pub(super) progress: ProgressArg,
    #[command(flatten)]
    pub(super) quiet: QuietArg,
    /// Minimum run of zero bytes to leave unallocated (default 4k; 0 = fully allocate).
    #[arg(short = 'S', long = "sparse-size")]
    pub(super) sparse: Option<String>,
    /// Do not create the target: write into an existing image.
    #[arg(short = 'n')]
    pub(super) no_create: bool,
    /// The existing target (with -n) already reads as zeroes.
    #[arg(long = "target-is-zero")]
    pub(super) target_is_zero: bool,
    /// Backing file of the output (only ranges differing from it are written).
    #[arg(short = 'B')]
    pub(super) backing: Option<String>,
    /// Format of the -B backing file.
    #[arg(short = 'F')]
    pub(super) backing_format: Option<String>,
    /// Parallel workers (1..16, default 8).
    #[arg(short = 'm', long = "parallel", default_value_t = 8)]
    pub(super) workers: usize,
    /// Copy what can be read of a damaged source: unreadable sectors become zeroes
    /// (each reported), failing block-status queries read as data.
    #[arg(long = "salvage")]
    pub(super) salvage: bool,
    /// Allow out-of-order writes.
    #[arg(short = 'W', long = "oob-writes")]
    pub(super) out_of_order: bool,
    /// Source internal snapshot: `snapshot.id=ID`, `snapshot.name=NAME` or `ID_OR_NAME`.
    #[arg(short = 'l')]
    pub(super) snapshot: Option<String>,
    /// Source cache mode: `writeback` (default), `none`/`directsync` (O_DIRECT reads),
    /// `writethrough`, `unsafe`.
    #[arg(short = 'T')]
    pub(super) src_cache: Option<String>,
    /// Target cache mode (docs/cli.md). Default: flushes skipped while the image is
    /// built, written back as it goes, one flush at the end (durable on return).
    /// `unsafe`: no flush at all (qemu-img's default); `writeback`: every flush honoured;
    /// `none`: O_DIRECT; `writethrough`/`directsync`: every write durable.
    #[arg(short = 't')]
    pub(super) cache: Option<String>,
    #[command(flatten)]
    pub(super) force_share: ForceShareArg,
    /// Output shaped for an upload: `azure` (fixed VHD, whole MiB), `esxi`
    /// (stream-optimized VMDK for vSphere), `gcp` (`disk.raw` in an oldgnu tar.gz), `ova`
    /// (OVF package); see docs/pipelines.md.
    #[arg(long = "target", value_enum)]
    pub(super) target: Option<super::targets::Target>,
    /// Source image(s) followed by the output file.
    #[arg(num_args = 1..)]
    pub(super) files: Vec<String>,
}
