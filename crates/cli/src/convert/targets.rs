//! `convert --target PROFILE SRC OUT|-`: outputs shaped for where they are uploaded, so
//! the upload succeeds the first time (see docs/pipelines.md):
//!
//! - `azure`: a fixed VHD whose size is rounded up to whole MiB and stored exactly
//!   (`-O vpc -o subformat=fixed,azure_align=on`);
//! - `esxi`: a stream-optimized VMDK in VMware's layout (version 3, grain directory in
//!   the footer) with the descriptor vSphere expects (LSI Logic adapter, hardware
//!   version 11, `ddb.toolsVersion`);
//! - `gcp`: `disk.raw` as a sparse member of an oldgnu tar.gz (Compute Engine's import
//!   layout, `tar --format=oldgnu -Sczf`);
//! - `ova`: an OVF package (descriptor, the `esxi` VMDK, SHA-256 manifest) for VMware
//!   and VirtualBox.
//!
//! Every target is written front to back; to a file, a failure removes it.

use std::io::Write;

use anyhow::{Context, Result, anyhow, bail};
use diskimg::stream::StreamProfile;
use diskimg::{BlockDevice, Image, OptionList};

use super::Args;
use crate::create::parse_options;
use crate::stream_progress::StreamProgress;

/// The `--target` profiles.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// Fixed VHD, whole MiB (Azure).
    Azure,
    /// Stream-optimized VMDK for vSphere/ESXi.
    Esxi,
    /// `disk.raw` in an oldgnu tar.gz (Google Compute Engine).
    Gcp,
    /// OVF package: descriptor, stream-optimized VMDK, SHA-256 manifest.
    Ova,
}

/// Deflate threads: one per core.
pub(super) fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

/// The descriptor fields of a stream-optimized VMDK: `base`, with `-o adapter_type=`,
/// `hwversion=` and `toolsversion=` applied.
pub(super) fn vmdk_profile(o: &mut OptionList, base: StreamProfile) -> Result<StreamProfile> {
    let mut p = base;
    if let Some(a) = o
        .take_enum(
            "adapter_type",
            &["ide", "lsilogic", "buslogic", "legacyESX"],
        )
        .map_err(|e| anyhow!("{e}"))?
    {
        p.adapter_type = a;
    }
    if let Some(h) = o.take("hwversion").filter(|h| h != "undefined") {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_digit()) {
            bail!("Invalid hwversion '{h}'");
        }
        p.hw_version = h;
    }
    if let Some(t) = o.take("toolsversion") {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            bail!("Invalid toolsversion '{t}'");
        }
        p.tools_version = t;
    }
    Ok(p)
}

/// Refuses a raw stream whose length is unknown until its end: `what` needs the size
/// in its first bytes.
pub(super) fn refuse_unknown_length(images: &[Image], what: &str) -> Result<()> {
    for img in images {
        if super::pipe::unknown_length(img) {
            bail!(
                "'{}': the length of this stream is unknown until its end, and {what} states it at its start; give a source of known length (or convert to raw or qcow2)",
                img.filename
            );
        }
    }
    Ok(())
}

/// `--target azure` is `-O vpc -o subformat=fixed,azure_align=on`: rewrites `a` so the
/// ordinary paths (file or stdout) do it. The other targets are written here.
pub(super) fn apply(a: &mut Args, t: Target) -> Result<()> {
    let implied = match t {
        Target::Azure => "vpc",
        Target::Esxi | Target::Ova => "vmdk",
        Target::Gcp => "raw",
    };
    if a.output_format != "raw" && a.output_format != implied {
        bail!(
            "--target {} writes {implied}; it cannot be combined with -O {}",
            format!("{t:?}").to_lowercase(),
            a.output_format
        );
    }
    if a.no_create || a.backing.is_some() || a.bitmaps || a.copy_range {
        bail!("-n, -B, -C and --bitmaps cannot be used with --target");
    }
    if t == Target::Azure {
        a.output_format = "vpc".into();
        a.options.push("subformat=fixed,azure_align=on".into());
    }
    Ok(())
}

/// True for the targets written by [`run`] (all but `azure`).
pub(super) fn writes_itself(t: Option<Target>) -> bool {
    t.is_some_and(|t| t != Target::Azure)
}

/// Where a target goes: stdout, or a file removed again if the conversion fails.
enum Sink {
    Stdout(std::io::BufWriter<std::io::StdoutLock<'static>>),
    File {
        w: std::io::BufWriter<std::fs::File>,
        path: String,
        ok: bool,
    },
}

impl Sink {
    fn open(dst: &str) -> Result<Sink> {
        if dst == "-" {
            return Ok(Sink::Stdout(std::io::BufWriter::with_capacity(
                4 << 20,
                std::io::stdout().lock(),
            )));
        }
        let f = std::fs::File::create(dst).with_context(|| format!("Could not create '{dst}'"))?;
        super::pipe::mark_created();
        Ok(Sink::File {
            w: std::io::BufWriter::with_capacity(4 << 20, f),
            path: dst.to_string(),
            ok: false,
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File { w, .. } => w,
        }
    }

    /// Flushes, and makes a file durable.
    fn finish(mut self) -> Result<()> {
        match &mut self {
            Sink::Stdout(w) => w.flush()?,
            Sink::File { w, ok, path } => {
                w.flush()
                    .and_then(|()| w.get_ref().sync_all())
                    .with_context(|| format!("error while writing to {path}"))?;
                *ok = true;
            }
        }
        Ok(())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Sink::File {
            path, ok: false, ..
        } = self
        {
            let _ = std::fs::remove_file(&*path);
        }
    }
}

/// The base name a target's members are named after: `OUT` without directory and
/// extension, `disk` for stdout.
fn stem(dst: &str) -> String {
    if dst == "-" {
        return "disk".into();
    }
    let base = std::path::Path::new(dst)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if base.is_empty() || base.contains(['"', '\n', '/']) {
        "disk".into()
    } else {
        base
    }
}

/// Writes `src` as target `t` (not `azure`, see [`apply`]) to `dst` (`-`: stdout).
pub(super) fn run(
    a: &Args,
    t: Target,
    src: &dyn BlockDevice,
    images: &[Image],
    dst: &str,
) -> Result<i32> {
    let mut o = parse_options(&a.options)?;
    refuse_unknown_length(images, "this target")?;
    let bar = StreamProgress::new(a.progress.on() && !a.quiet.on());
    let err = |e: diskimg::Error| anyhow!("error while writing to {dst}: {e}");
    match t {
        Target::Esxi => {
            let profile = vmdk_profile(&mut o, StreamProfile::esxi())?;
            check_consumed(&o)?;
            let mut sink = Sink::open(dst)?;
            let name = format!("{}.vmdk", stem(dst));
            diskimg::stream::write_vmdk(
                src,
                sink.writer(),
                &name,
                &profile,
                threads(),
                &mut |d, t| bar.update(d, Some(t)),
            )
            .map_err(err)?;
            sink.finish()?;
        }
        Target::Gcp => {
            check_consumed(&o)?;
            let mut sink = Sink::open(dst)?;
            let size = src.virtual_size();
            // The sparse map comes before the data: a stream can be walked only once.
            let sparse = forward_source(images).is_none();
            diskimg::stream::write_gcp(src, sink.writer(), threads(), sparse, &mut |d| {
                bar.update(d, Some(size))
            })
            .map_err(err)?;
            sink.finish()?;
        }
        Target::Ova => {
            let spec = ova_spec(&mut o, &stem(dst))?;
            check_consumed(&o)?;
            let mut progress = |d, t| bar.update(d, Some(t));
            let mut sink = Sink::open(dst)?;
            match &mut sink {
                Sink::File { w, .. } => diskimg::stream::write_ova(src, w, &spec, &mut progress),
                Sink::Stdout(w) => {
                    if let Some(s) = forward_source(images) {
                        bail!(
                            "'{s}': an OVA on stdout reads its source twice (the disk's size comes before the disk): give a seekable source, or write the OVA to a file"
                        );
                    }
                    diskimg::stream::write_ova_twice(src, w, &spec, &mut progress)
                }
            }
            .map_err(err)?;
            sink.finish()?;
        }
        Target::Azure => bail!("--target azure is converted as -O vpc"),
    }
    bar.end();
    Ok(0)
}

/// The OVA's virtual machine: `-o name=,cpus=,memory=(MiB),ostype=other|linux` and
/// the disk's `adapter_type=`, `hwversion=`, `toolsversion=`.
fn ova_spec(o: &mut OptionList, default_name: &str) -> Result<diskimg::stream::OvaSpec> {
    let mut spec =
        diskimg::stream::OvaSpec::new(&o.take("name").unwrap_or_else(|| default_name.into()));
    spec.profile = vmdk_profile(o, StreamProfile::esxi())?;
    spec.threads = threads();
    if let Some(c) = o.take_u64("cpus").map_err(|e| anyhow!("{e}"))? {
        spec.cpus = u32::try_from(c)
            .ok()
            .filter(|c| (1..=768).contains(c))
            .ok_or_else(|| anyhow!("cpus must be 1 to 768"))?;
    }
    if let Some(m) = o.take_u64("memory").map_err(|e| anyhow!("{e}"))? {
        spec.memory_mib = m.clamp(4, 24 << 20);
    }
    match o
        .take_enum("ostype", &["other", "linux"])
        .map_err(|e| anyhow!("{e}"))?
        .as_deref()
    {
        Some("linux") => spec.os = (101, "otherLinux64Guest".into()),
        _ => spec.os = (102, "otherGuest64".into()),
    }
    Ok(spec)
}

/// The name of a source that can be read only once, front to back, if any.
fn forward_source(images: &[Image]) -> Option<&str> {
    images
        .iter()
        .find(|i| crate::source::opened(&i.filename).is_some_and(|o| o.forward.is_some()))
        .map(|i| i.filename.as_str())
}

/// Refuses `-o` options no step took.
fn check_consumed(o: &OptionList) -> Result<()> {
    if let Some((k, _)) = o.entries().first() {
        bail!("Invalid parameter '{k}' for this target");
    }
    Ok(())
}
