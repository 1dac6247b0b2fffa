//! `amend [--object …] [--image-opts] [-f FMT] [-p] [-q] [-t CACHE] [--force] -o OPTIONS FILE`:
//! change options of an existing image — qcow2 `compat`, `lazy_refcounts`, `size`, and LUKS
//! key-slot management (`encrypt.state`, `encrypt.new-secret`, `encrypt.old-secret`,
//! `encrypt.keyslot`, `encrypt.iter-time`).

use anyhow::{Result, anyhow, bail};
use diskimg::OptionList;

use crate::args::{CacheArg, FormatArg, ProgressArg, QuietArg};
use crate::common::{Progress, open_image};

/// Arguments of `amend`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// The options to change (may repeat).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    #[command(flatten)]
    progress: ProgressArg,
    #[command(flatten)]
    quiet: QuietArg,
    #[command(flatten)]
    cache: CacheArg,
    /// Allow dangerous changes (accepted).
    #[arg(long = "force")]
    force: bool,
    /// The image.
    file: Option<String>,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = a.cache.mode();
    crate::optlist::check(&a.options)?;
    if a.options.is_empty() {
        bail!("Must specify options (-o)\nTry 'diskimg amend --help' for more info");
    }
    if crate::optlist::wants_help(&a.options) {
        return match (&a.format.format, &a.file) {
            (Some(f), _) => print_help(f),
            (None, Some(file)) => {
                let img = open_image(file, None, true, false)?;
                print_help(img.format.name())
            }
            (None, None) => bail!("Expecting one image file name"),
        };
    }
    let Some(file) = a.file.clone() else {
        bail!("Expecting one image file name");
    };
    // As qemu: progress starts before the image opens; 0% and 100% around the change.
    let bar = Progress::new(a.progress.on() && !a.quiet.on(), 1.0);
    let mut all = OptionList::new();
    for o in &a.options {
        all.extend_from(o).map_err(|e| anyhow!("{e}"))?;
    }
    let format = a.format.of(&file)?;
    let img = open_image(&file, format, false, false)?;
    if !all.is_empty() {
        // Refused before any progress, as qemu does for drivers without amend; options
        // the format cannot amend fail in its option parsing, also before any progress
        // (nothing is changed).
        diskimg::maint::amender(&img)?.check_options(&all)?;
    }
    bar.print(0.0, 0);
    // As qemu: 100% is reported whether or not the change worked.
    let amended = if all.is_empty() {
        Ok(())
    } else {
        // qemu-img's amend_status_cb: `100.f * offset / total_work_size` in float.
        #[allow(clippy::cast_precision_loss)]
        let mut report = |done: u64, total: u64| {
            if total > 0 {
                bar.print(100.0f32 * done as f32 / total as f32, 0);
            }
        };
        diskimg::maint::amend_with_progress(
            &img,
            &all,
            &crate::secrets::secrets(),
            a.force,
            &mut report,
        )
    };
    bar.print(100.0, 0);
    amended.map_err(|e| match crate::errmap::snapshot_l1_refusal(&e) {
        // qemu meets it expanding the snapshots' zero clusters in a downgrade.
        Some((what, errno)) => {
            eprintln!("{}: {what}", crate::common::prog());
            anyhow!("Failed to turn zero into data clusters: {errno}")
        }
        None => e.into(),
    })?;
    img.close()?;
    bar.end();
    Ok(0)
}

/// The key-slot options of qcow2's amend that `create` does not take (qemu's texts).
const KEYSLOT_OPTIONS: &[(&str, &str, &str)] = &[
    (
        "encrypt.keyslot",
        "num",
        "Select a single keyslot to modify explicitly",
    ),
    (
        "encrypt.new-secret",
        "str",
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    (
        "encrypt.old-secret",
        "str",
        "Select all keyslots that match this password",
    ),
    (
        "encrypt.state",
        "str",
        "Select new state of affected keyslots (active/inactive)",
    ),
];

/// The create options qcow2's amend takes as well.
const AMENDABLE_CREATE_OPTIONS: &[&str] = &[
    "backing_file",
    "backing_fmt",
    "compat",
    "data_file",
    "data_file_raw",
    "encrypt.iter-time",
    "lazy_refcounts",
    "refcount_bits",
    "size",
];

/// `amend -o help`: the options the format can amend, as qemu-img lists them.
fn print_help(format: &str) -> Result<i32> {
    let f = match crate::common::parse_format(format) {
        Ok(f) if f == diskimg::Format::Qcow2 => f,
        Ok(_) => bail!("Format driver '{format}' does not support option amendment"),
        Err(_)
            if crate::common::parse_create_format(format)
                .is_err_and(|e| e.to_string().contains("does not support image creation")) =>
        {
            bail!("Format driver '{format}' does not support option amendment")
        }
        Err(e) => return Err(e),
    };
    let mut rows: Vec<(String, String, String)> = f
        .driver()?
        .create_options()
        .iter()
        .filter(|s| AMENDABLE_CREATE_OPTIONS.contains(&s.name))
        .map(|s| (s.name.to_string(), s.kind.to_string(), s.help.to_string()))
        .collect();
    for (n, k, h) in KEYSLOT_OPTIONS {
        rows.push(((*n).to_string(), format!("<{k}>"), (*h).to_string()));
    }
    rows.sort();
    let mut s = format!("Amend options for '{format}':\n");
    for (name, kind, help) in rows {
        let left = format!("{name}={kind}");
        s.push_str(&format!("  {left:<22} - {help}\n"));
    }
    crate::common::out(&s)?;
    Ok(0)
}
