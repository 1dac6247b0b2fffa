//! `create [-f FMT] [-o OPTS] [-b BACKING -F FMT] [-u] [-q] FILE [SIZE]`.

use anyhow::{Result, anyhow, bail};
use diskimg::blockio::FILE_CREATE_OPTIONS;
use diskimg::{Format, ImageOptions, OpenPolicy, OptionList};

use crate::common::{full_backing_name, out, parse_format, parse_size, round_to_sector};

/// Arguments of `create`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Image format (default raw).
    #[arg(short = 'f', long = "format", default_value = "raw")]
    format: String,
    /// Format options, `key=value,…` (`-o help` lists them); may repeat.
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Backing file of the new image.
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Do not open the backing file (needs SIZE).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// File to create (optional with `-o help`).
    file: Option<String>,
    /// Virtual size (k, M, G, T suffixes).
    size: Option<String>,
}

/// Prints the create options of `format` as `qemu-img create -o help` does: without a
/// target file the format's own options and qemu's note about the protocol level; with
/// one, merged with the `file` protocol's options (the format's entry wins a name both
/// have), sorted by name.
pub(crate) fn print_help(format: Format, with_file: bool) -> Result<i32> {
    let mut specs: Vec<_> = format.driver()?.create_options().to_vec();
    if with_file {
        for f in FILE_CREATE_OPTIONS {
            if !specs.iter().any(|s| s.name == f.name) {
                specs.push(*f);
            }
        }
    }
    specs.sort_by_key(|s| s.name);
    let mut s = if with_file {
        String::from("Supported options:\n")
    } else {
        format!("Supported {} options:\n", format.name())
    };
    for spec in specs {
        let left = format!("{}={}", spec.name, spec.kind);
        s.push_str(&format!("  {left:<22} - {}\n", spec.help));
    }
    if !with_file {
        s.push_str(
            "\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
        );
    }
    out(&s)?;
    Ok(0)
}

/// True when `create -o KEY=…` is valid for `format` (its own or a `file` protocol
/// option).
pub(crate) fn known_option(format: Format, key: &str) -> Result<bool> {
    Ok(format
        .driver()?
        .create_options()
        .iter()
        .chain(FILE_CREATE_OPTIONS)
        .any(|s| s.name == key))
}

/// Merges repeated `-o` strings into one option list.
pub(crate) fn parse_options(opts: &[String]) -> Result<OptionList> {
    let mut list = OptionList::new();
    for o in opts {
        list.extend_from(o)?;
    }
    Ok(list)
}

pub(crate) fn run(mut a: Args) -> Result<i32> {
    crate::optlist::check(&a.options)?;
    let name = a.file.clone().unwrap_or_default();
    let format = crate::common::parse_create_format(&a.format).map_err(|e| {
        // qemu names the file only when one was given.
        if name.is_empty() {
            e
        } else {
            anyhow!("{name}: {e}")
        }
    })?;
    if crate::optlist::wants_help(&a.options) {
        return print_help(format, a.file.is_some());
    }
    let Some(file) = a.file.take() else {
        bail!("Expecting image file name\nTry 'diskimg create --help' for more info");
    };
    run_file(a, format, file)
}

fn run_file(a: Args, format: Format, file: String) -> Result<i32> {
    crate::opening::check_create_name(&file).map_err(|e| anyhow!("{file}: {e}"))?;
    let mut options = parse_options(&a.options)?;
    let specs = format.driver()?.create_options();
    if let Some(b) = &a.backing {
        if !specs.iter().any(|s| s.name == "backing_file") {
            bail!(
                "{file}: Backing file not supported for file format '{}'",
                format.name()
            );
        }
        options.set("backing_file", b);
    }
    if let Some(f) = &a.backing_format {
        parse_format(f)?;
        options.set("backing_fmt", f);
    }
    for (k, _) in options.entries() {
        if !known_option(format, k)? {
            bail!("{file}: Invalid parameter '{k}'");
        }
    }
    // As qemu, malformed host hints fail before the "Formatting" line.
    let mut hints = options.clone();
    hints
        .take_bool("nocow")
        .and_then(|_| hints.take_size("extent_size_hint"))
        .map_err(|e| anyhow!("{file}: {e}"))?;
    let mut size = a.size.as_deref().map(parse_size).transpose()?;
    if size.is_none()
        && let Some(s) = options.get("size")
    {
        size = Some(parse_size(s)?);
    }
    let backing = options.get("backing_file").map(str::to_string);
    if let Some(b) = backing.as_deref().filter(|b| !b.is_empty()) {
        let fmt = options.get("backing_fmt").map(parse_format).transpose()?;
        if a.unsafe_backing {
            if fmt.is_none() {
                bail!("{file}: Backing file specified without backing format");
            }
            if size.is_none() {
                bail!("{file}: Image creation needs a size parameter");
            }
        } else {
            // As qemu: the backing file is opened first (its metadata only), which names
            // the format it detected when none was given, and gives the size.
            let full = full_backing_name(&crate::names::host_path(&file), b);
            let (path, _, mut opts) = crate::secrets::resolve(&full, fmt)?;
            opts = opts
                .with_policy(OpenPolicy::qemu_compatible())
                .with_backing(false);
            opts.read_only = true;
            opts.metadata_only = true;
            opts.driver_options.set("encrypt.no-io", "on");
            let img = if b.starts_with("json:") {
                // A `json:{…}` name is opened as qemu-img opens one given as an image.
                crate::imgspec::open_arg(b, fmt, opts)
            } else {
                crate::names::open_file(&full, &path, fmt, &opts)
            }
            .map_err(|e| {
                anyhow!(
                    "{file}: {}\nCould not open backing image.",
                    crate::message(&e)
                )
            })?;
            if fmt.is_none() {
                bail!(
                    "{file}: Backing file specified without backing format\nDetected format of {}.",
                    img.format.name()
                );
            }
            size.get_or_insert(img.device.virtual_size());
        }
    }
    let Some(size) = size else {
        bail!("{}: Image creation needs a size parameter", file);
    };
    let line = crate::formatting::line(&file, format.name(), &options, size);
    options.take("size");
    if !a.quiet {
        out(&format!("{line}\n"))?;
    }
    let mut opts = ImageOptions::default()
        .with_policy(OpenPolicy::qemu_compatible())
        .with_secrets(crate::secrets::secrets());
    opts.node_drivers = crate::io::blkdebug::node_drivers();
    diskimg::create(
        crate::names::host_path(&file),
        format,
        Some(round_to_sector(size)?),
        options,
        &opts,
    )
    .map_err(|e| anyhow!("{}: {e}", file))?;
    Ok(0)
}
