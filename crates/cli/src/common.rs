//! Helpers shared by the verbs: program name, format and size arguments, output.
//! Opening images as qemu-img does is in [`crate::opening`] (re-exported here).

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use diskimg::Format;

pub(crate) use crate::opening::{
    lock_own_file, open_image, open_resolved, report_open_repairs, set_force_share, warn_probed_raw,
};

/// The program name messages start with: `qemu-img` or `qemu-io` when the binary was
/// invoked under that name (a symlink: how diskimg is installed as a drop-in, so tools
/// parsing qemu's messages keep working), else `diskimg`.
pub(crate) fn prog() -> &'static str {
    static PROG: OnceLock<&'static str> = OnceLock::new();
    PROG.get_or_init(|| {
        let argv0 = std::env::args_os().next().unwrap_or_default();
        let base = Path::new(&argv0)
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        match base.as_str() {
            "qemu-img" => "qemu-img",
            "qemu-io" => "qemu-io",
            _ => "diskimg",
        }
    })
}

/// True when invoked as `qemu-img`/`qemu-io` (see [`prog`]): qemu's exact wording is
/// wanted, not diskimg's additions.
pub(crate) fn as_qemu() -> bool {
    prog() != "diskimg"
}

/// Parses a format name (`-f`, `-O`, `-F`).
pub(crate) fn parse_format(name: &str) -> Result<Format> {
    Format::from_name(name).map_err(|_| anyhow!("Unknown file format '{name}'"))
}

/// qemu's read-only format drivers: known to qemu, but they cannot create images.
const READ_ONLY_DRIVERS: &[&str] = &["bochs", "cloop", "dmg"];

/// Parses the format of an image to create (`create -f`, `convert -O`): qemu's
/// read-only formats are refused as qemu refuses them, not as unknown.
pub(crate) fn parse_create_format(name: &str) -> Result<Format> {
    if READ_ONLY_DRIVERS.contains(&name) {
        return Err(anyhow!(
            "Format driver '{name}' does not support image creation"
        ));
    }
    parse_format(name)
}

/// qemu's other drivers an image may name as its backing format (`-F` with `-u`):
/// kept as given although diskimg cannot open them.
const OTHER_BACKING_DRIVERS: &[&str] = &[
    "host_device",
    "host_cdrom",
    "file",
    "bochs",
    "cloop",
    "dmg",
    "parallels",
    "qcow",
    "qed",
    "vvfat",
];

/// Checks a backing format to write into an image without opening the backing file
/// (`rebase -u -F`): diskimg's formats and qemu's other drivers.
pub(crate) fn check_backing_format_name(name: &str) -> Result<()> {
    if OTHER_BACKING_DRIVERS.contains(&name) {
        return Ok(());
    }
    parse_format(name).map(|_| ())
}

/// Parses the optional `-f` format of an image to open (qemu: "Unknown driver").
pub(crate) fn opt_format(name: Option<&str>, file: &str) -> Result<Option<Format>> {
    name.map(|n| {
        Format::from_name(n).map_err(|_| anyhow!("Could not open '{file}': Unknown driver '{n}'"))
    })
    .transpose()
}

/// Parses `--output=human|json` (true for json).
pub(crate) fn parse_output(o: &str) -> Result<bool> {
    match o {
        "json" => Ok(true),
        "human" => Ok(false),
        _ => Err(anyhow!("--output expects 'human' or 'json' not '{o}'")),
    }
}

/// Parses a qemu size argument (`64M`, `1.5G`, `512`).
pub(crate) fn parse_size(s: &str) -> Result<u64> {
    diskimg::parse_size(s).map_err(|_| anyhow!("Invalid image size specified: '{s}'."))
}

/// Image sizes are rounded up to whole 512-byte sectors when created, as qemu-img does.
pub(crate) fn round_to_sector(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(512)
        .ok_or_else(|| anyhow!("Image size too large"))
}

/// qemu's `size_to_str`: three significant digits and a binary unit (`64 MiB`,
/// `1.31 MiB`, `324 KiB`, `0 B`).
pub(crate) fn human_size(v: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // From 1000 of a unit up, qemu rolls over into the next unit (0.977 KiB).
    let mut i = 0usize;
    let mut div = 1u128;
    while i + 1 < UNITS.len() && u128::from(v) >= 1000 * div {
        div *= 1024;
        i += 1;
    }
    #[allow(clippy::cast_precision_loss)]
    let x = v as f64 / div as f64;
    format!("{} {}B", fmt_g3(x), UNITS.get(i).copied().unwrap_or(""))
}

/// `printf("%0.3g")` for the values `human_size` produces (0 ≤ x < 1024).
fn fmt_g3(x: f64) -> String {
    let s = if x >= 99.95 {
        format!("{x:.0}")
    } else if x >= 9.995 {
        format!("{x:.1}")
    } else if x >= 0.9995 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The directory of a path as given (`.`-free: empty for a bare name).
pub(crate) fn dir_of(file: &str) -> PathBuf {
    Path::new(file)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// qemu's `path_combine`: a backing name relative to the image's directory.
pub(crate) fn full_backing_name(image: &str, backing: &str) -> String {
    // As qemu's `bdrv_make_absolute_filename`: a protocol name (`foo:bar`) is kept.
    if Path::new(backing).is_absolute() || diskimg::protocol_of(backing).is_some() {
        return backing.to_string();
    }
    dir_of(image).join(backing).to_string_lossy().into_owned()
}

/// Writes `s` to stdout in one go.
pub(crate) fn out(s: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())?;
    o.flush()?;
    Ok(())
}

/// qemu's progress reporter (`util/qemu-progress.c`) for `-p`: on stdout,
/// `    (%3.2f/100%)\r` whenever the percentage moves more than `min_skip` past the last
/// report or is exactly 0 or 100, and a single `\n` at the end (also on error paths,
/// through `Drop`). Operators parse this output, so it matches qemu-img byte for byte.
pub(crate) struct Progress {
    enabled: bool,
    min_skip: f32,
    current: Cell<f32>,
    last_print: Cell<f32>,
    ended: Cell<bool>,
}

impl Progress {
    /// `qemu_progress_init(enabled, min_skip)`.
    pub(crate) fn new(enabled: bool, min_skip: f32) -> Self {
        Self {
            enabled,
            min_skip,
            current: Cell::new(0.0),
            last_print: Cell::new(0.0),
            ended: Cell::new(false),
        }
    }

    /// Whether records are printed (`-p` without `-q`).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// `qemu_progress_print(delta, max)`: with `max == 0`, `delta` is the absolute
    /// percentage; otherwise it advances by `delta` percent of `max` percent.
    pub(crate) fn print(&self, delta: f32, max: u8) {
        let mut current = if max == 0 {
            delta
        } else {
            self.current.get() + delta / 100.0 * f32::from(max)
        };
        if current > 100.0 {
            current = 100.0;
        }
        self.current.set(current);
        let last = self.last_print.get();
        if current > last + self.min_skip
            || current < last - self.min_skip
            || current == 100.0
            || current == 0.0
        {
            self.last_print.set(current);
            if self.enabled {
                let mut o = std::io::stdout().lock();
                // As printf: a failed progress write is not an error of the operation.
                let _ = write!(o, "    ({:.2}/100%)\r", f64::from(current));
                let _ = o.flush();
            }
        }
    }

    /// Reports `done` of `total` as an absolute percentage (nothing when `total` is 0).
    pub(crate) fn fraction(&self, done: u64, total: u64) {
        if total > 0 {
            // Precision loss is irrelevant for a percentage printed with 2 decimals.
            #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
            let pct = (done as f64 * 100.0 / total as f64) as f32;
            self.print(pct, 0);
        }
    }

    /// `qemu_progress_end()`: the final newline (once).
    pub(crate) fn end(&self) {
        if self.enabled && !self.ended.replace(true) {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(b"\n");
            let _ = o.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        // Expected strings are what qemu-img info prints for these sizes.
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(67108864), "64 MiB");
        assert_eq!(human_size(65536), "64 KiB");
        assert_eq!(human_size(331776), "324 KiB");
        assert_eq!(human_size(1376256), "1.31 MiB");
        assert_eq!(human_size(1000), "0.977 KiB");
    }
}
