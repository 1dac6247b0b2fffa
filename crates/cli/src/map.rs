//! `map [-f FMT] [--output=human|json] [--start-offset=OFF] [--max-length=LEN] FILE`.

use anyhow::Result;
use diskimg::{Image, MapEntry};

use std::io::{IsTerminal, Write};

use crate::args::{FormatArg, OutputArg, ReadOnlyShareArg};
use crate::common::{full_backing_name, open_image, parse_size};
use crate::json::map_entry;

/// Arguments of `map`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    #[command(flatten)]
    output: OutputArg,
    /// First guest byte to map.
    #[arg(short = 's', long = "start-offset")]
    start_offset: Option<String>,
    /// Map at most this many bytes.
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    #[command(flatten)]
    force_share: ReadOnlyShareArg,
    /// The image.
    file: String,
}

/// The file name qemu prints for an entry: the layer at its depth, or — for a layer whose
/// data lives in other files (VMDK extents, a qcow2 data file) — the file its offset is in,
/// relative to that layer's directory.
fn entry_file(img: &Image, top: &str, e: &MapEntry) -> String {
    let mut name = top.to_string();
    let mut cur = img;
    for _ in 0..e.depth {
        match cur.backing.as_deref() {
            Some(b) => {
                name = full_backing_name(&name, &b.filename);
                cur = b;
            }
            None => break,
        }
    }
    match e
        .file
        .checked_sub(1)
        .and_then(|i| cur.device.host_files().into_iter().nth(i))
    {
        Some(f) => full_backing_name(&name, &f),
        None => name,
    }
}

pub(crate) fn run(a: Args) -> Result<i32> {
    a.force_share.apply();
    let json = a.output.json()?;
    let format = a.format.of(&a.file)?;
    let img = open_image(&a.file, format, true, true)?;
    let size = img.device.virtual_size();
    let start = match &a.start_offset {
        Some(s) => parse_size(s).map_err(|_| anyhow::anyhow!("Invalid start offset specified! You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."))?,
        None => 0,
    };
    let max = match &a.max_length {
        Some(s) => parse_size(s).map_err(|_| anyhow::anyhow!("Invalid length specified! You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."))?,
        None => u64::MAX,
    };
    let end = start.saturating_add(max).min(size);
    // Entries are written as they are found (memory stays constant however fragmented
    // the image is or claims to be).
    let mut o = std::io::BufWriter::new(std::io::stdout().lock());
    let entries = diskimg::map_chain_iter(
        img.device.as_ref(),
        start.min(end),
        end.saturating_sub(start),
    )?;
    if json {
        o.write_all(b"[")?;
        if start >= end {
            // qemu prints one empty entry when there is nothing to map.
            let empty = MapEntry {
                start,
                length: 0,
                depth: 0,
                present: false,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
                file: 0,
            };
            o.write_all(map_entry(&empty).as_bytes())?;
        }
        for (i, e) in entries.enumerate() {
            let e = match e {
                Ok(e) => e,
                Err(e) => return metadata_failure(&mut o, e),
            };
            if i > 0 {
                o.write_all(b",\n")?;
            }
            o.write_all(map_entry(&e).as_bytes())?;
        }
        o.write_all(b"]\n")?;
    } else {
        // The file the data is in: a specification names it inside.
        let top = if crate::imgspec::is_spec_or_opts(&a.file) {
            img.path.to_string_lossy().into_owned()
        } else {
            crate::names::shown(&a.file, false)
        };
        writeln!(o, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to")?;
        for e in entries {
            let e = match e {
                Ok(e) => e,
                Err(e) => return metadata_failure(&mut o, e),
            };
            if e.data && e.offset.is_none() {
                // Reported as qemu-img's buffered stdout orders it: on a terminal the
                // lines so far come first, into a pipe or file they follow the message.
                if std::io::stdout().is_terminal() {
                    o.flush()?;
                }
                eprintln!(
                    "{}: File contains external, encrypted or compressed clusters.",
                    crate::common::prog()
                );
                o.flush()?;
                return Ok(1);
            }
            if let (true, false, Some(off)) = (e.data, e.zero, e.offset) {
                writeln!(
                    o,
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(off),
                    entry_file(&img, &top, &e)
                )?;
            }
        }
    }
    o.flush()?;
    Ok(0)
}

/// C's `%#x`: `0` for zero, `0x…` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// A failure to map (a corrupt table met on the way) as qemu-img's map reports it:
/// `Could not read file metadata: strerror`, exit 1, the entries so far printed as its
/// buffered stdout orders them (on a terminal first, into a pipe or file after it).
fn metadata_failure(o: &mut impl Write, e: diskimg::Error) -> Result<i32> {
    if std::io::stdout().is_terminal() {
        o.flush()?;
    }
    let why = if crate::common::as_qemu() {
        crate::errmap::strerror(&e)
    } else {
        crate::errmap::message(&e.into())
    };
    eprintln!(
        "{}: Could not read file metadata: {why}",
        crate::common::prog()
    );
    o.flush()?;
    Ok(1)
}
