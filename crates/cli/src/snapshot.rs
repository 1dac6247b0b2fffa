//! `snapshot [-f FMT] [-q] [-U] [-l | -c NAME | -a NAME | -d NAME] FILE`: internal
//! snapshots (qcow2), with qemu-img's table and messages.

use anyhow::{Result, anyhow, bail};
use diskimg::blockio::SnapshotInfo;

use crate::args::{FormatArg, QuietArg};
use crate::common::{human_size, open_image, out};

/// Arguments of `snapshot`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// List the snapshots (the default).
    #[arg(short = 'l', conflicts_with_all = ["create", "apply", "delete"])]
    list: bool,
    /// Create a snapshot.
    #[arg(short = 'c', value_name = "SNAPSHOT", conflicts_with_all = ["apply", "delete"])]
    create: Option<String>,
    /// Apply (revert the disk to) a snapshot.
    #[arg(short = 'a', value_name = "SNAPSHOT", conflicts_with = "delete")]
    apply: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
    #[command(flatten)]
    quiet: QuietArg,
    /// Open read-only shared (only with -l).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = (a.list, a.quiet.on());
    let format = a.format.of(&a.file)?;
    let listing = a.create.is_none() && a.apply.is_none() && a.delete.is_none();
    if a.force_share && !listing {
        bail!("--force-share/-U can only be used with -l");
    }
    crate::common::set_force_share(a.force_share);
    let img = open_image(&a.file, format, listing, false)?;
    if let Some(name) = &a.create {
        diskimg::maint::create_snapshot(&img, name).map_err(|e| {
            // qemu-img prints strerror(-ret) of the driver's failure (EINVAL for a
            // refcount overflow, ENOTSUP, or the host's errno).
            let why = match &e {
                diskimg::Error::Unsupported { .. }
                | diskimg::Error::InvalidArgument(_)
                | diskimg::Error::Io { .. } => crate::errmap::strerror(&e),
                _ => e.to_string(),
            };
            anyhow!("Could not create snapshot '{name}': {why}")
        })?;
    } else if let Some(name) = &a.apply {
        let known = img.device.info().snapshots;
        if img.device.as_snapshots().is_none() {
            bail!("Could not apply snapshot '{name}': Block driver does not support snapshots");
        }
        if !known.iter().any(|s| &s.id == name || &s.name == name) {
            bail!(
                "Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
            );
        }
        diskimg::maint::apply_snapshot(&img, name).map_err(|e| {
            if let Some((what, errno)) = crate::errmap::snapshot_l1_refusal(&e) {
                eprintln!("{}: {what}", crate::common::prog());
                return anyhow!(
                    "Could not apply snapshot '{name}': Failed to load snapshot: {errno}"
                );
            }
            anyhow!("Could not apply snapshot '{name}': {e}")
        })?;
    } else if let Some(name) = &a.delete {
        let known = img.device.info().snapshots;
        if !known.iter().any(|s| &s.id == name || &s.name == name) {
            bail!("Could not delete snapshot '{name}': snapshot not found");
        }
        diskimg::maint::delete_snapshot(&img, name)
            .map_err(|e| anyhow!("Could not delete snapshot '{name}': {e}"))?;
    } else {
        let list = img.device.info().snapshots;
        if !list.is_empty() {
            out(&format!("Snapshot list:\n{}", table(&list)))?;
        }
    }
    img.close()?;
    Ok(0)
}

/// qemu's `bdrv_snapshot_dump` table (header and one row per snapshot); dates are
/// printed in UTC (qemu uses the local time zone).
pub(crate) fn table(list: &[SnapshotInfo]) -> String {
    let mut s = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in list {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        // qemu shows an unknown icount (-1) as "--".
        let icount = sn
            .icount
            .map_or_else(|| "--".to_string(), |i| i.to_string());
        s.push_str(&format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            date(sn.date_sec),
            clock,
            icount
        ));
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of seconds since the epoch.
fn date(secs: u64) -> String {
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        // `date -u -d @N '+%F %T'`.
        assert_eq!(date(0), "1970-01-01 00:00:00");
        assert_eq!(date(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(date(1_795_577_082), "2026-11-25 03:24:42");
    }
}
