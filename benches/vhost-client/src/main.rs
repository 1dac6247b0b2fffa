//! A host-side vhost-user-blk benchmark client on libblkio (crates.io `blkio`): the
//! same rows as benches/serve-vhost.sh (fio in a guest), without the guest.
//!
//! ```text
//! vhost-client bench --target NAME=SOCKET[,PID] ... [--cases a,b] [--secs S] [--rounds R]
//!                    [--queue-size N] [--seg-kib K] [--raw FILE] [--first-round N]
//! vhost-client table FILE...
//! vhost-client info SOCKET
//! ```
//! `bench` connects to every target once, then runs each case in rounds, each round every
//! target back to back with the first one rotating, and prints a markdown table of
//! medians: IOPS (4 KiB rows) or MiB/s, each target's ratio to the last target (the
//! reference, e.g. qemu-storage-daemon) with the range of per-round ratios, the server's
//! CPU time per I/O (user + system of PID from /proc, when given) and virtio requests per
//! I/O. `--raw FILE` also appends every round's measurement to FILE (rounds numbered from
//! `--first-round`), and `table FILE...` prints the table of all the runs recorded there
//! (several files: each one's rounds numbered after the previous ones'):
//! benches/serve-vhost-host.sh starts the servers once per rotation of the image copies
//! among them (a copy's place on the disk can be worth 30% on `O_DIRECT`), runs `bench`
//! each time and prints the combined table.
#![deny(unsafe_code)]

mod load;
mod table;

use diskimg_vhost_client::dev::Device;
use load::{Case, Shape};
use std::process::ExitCode;

/// One server under test.
pub struct Target {
    /// Column name.
    pub name: String,
    /// Its connection.
    pub dev: Device,
    /// How I/Os are cut into requests for it.
    pub shape: Shape,
    /// The server's pid, for its CPU time.
    pub pid: Option<u32>,
}

struct Opts {
    targets: Vec<(String, String, Option<u32>)>,
    cases: Vec<Case>,
    secs: f64,
    rounds: usize,
    queue_size: i32,
    seg_kib: usize,
    raw: Option<String>,
    first_round: usize,
}

const ALL: &str = "randread-4k-1,randread-4k-16,randwrite-4k-1,randwrite-4k-16,\
                   read-1M-1,read-1M-16,write-1M-1,write-1M-16";

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        targets: Vec::new(),
        cases: Vec::new(),
        secs: 3.0,
        rounds: 5,
        queue_size: 1024,
        seg_kib: 4,
        raw: None,
        first_round: 0,
    };
    let mut cases = ALL.to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--target" => {
                let v = val()?;
                let (name, rest) = v.split_once('=').ok_or("--target NAME=SOCKET[,PID]")?;
                let (sock, pid) = match rest.split_once(',') {
                    Some((s, p)) => (s, Some(p.parse().map_err(|_| format!("bad pid {p}"))?)),
                    None => (rest, None),
                };
                o.targets.push((name.to_string(), sock.to_string(), pid));
            }
            "--cases" => cases = val()?,
            "--secs" => o.secs = val()?.parse().map_err(|_| "bad --secs")?,
            "--rounds" => o.rounds = val()?.parse().map_err(|_| "bad --rounds")?,
            "--queue-size" => o.queue_size = val()?.parse().map_err(|_| "bad --queue-size")?,
            "--seg-kib" => o.seg_kib = val()?.parse().map_err(|_| "bad --seg-kib")?,
            "--raw" => o.raw = Some(val()?),
            "--first-round" => {
                o.first_round = val()?.parse().map_err(|_| "bad --first-round")?;
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    o.cases = cases
        .split(',')
        .filter(|c| !c.is_empty())
        .map(Case::parse)
        .collect::<Result<_, _>>()?;
    if o.targets.is_empty() || o.rounds == 0 || o.seg_kib == 0 {
        return Err("need --target, --rounds >= 1 and --seg-kib >= 1".into());
    }
    Ok(o)
}

fn bench(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let buf = o.cases.iter().map(|c| c.bs * c.qd).max().unwrap_or(4096);
    let mut targets = Vec::new();
    for (name, sock, pid) in &o.targets {
        let dev = Device::connect(sock, o.queue_size, buf, false)
            .map_err(|e| format!("{name} ({sock}): {e}"))?;
        let l = dev.limits()?;
        let shape = Shape::guest(&l, o.seg_kib * 1024);
        eprintln!("{name}: {l:?} -> {shape:?}");
        targets.push(Target {
            name: name.clone(),
            dev,
            shape,
            pid: *pid,
        });
    }
    let size = targets
        .iter()
        .map(|t| t.dev.limits().map(|l| l.capacity))
        .collect::<Result<Vec<_>, _>>()?;
    let size = size.into_iter().min().unwrap_or(0);
    let records = table::run(
        &mut targets,
        &o.cases,
        size,
        o.secs,
        o.rounds,
        o.first_round,
    )?;
    if let Some(path) = &o.raw {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{path}: {e}"))?;
        for r in &records {
            writeln!(f, "{}", r.line()).map_err(|e| format!("{path}: {e}"))?;
        }
    }
    print!("{}", table::print(&records));
    Ok(())
}

/// Prints the table of the records in one or more `--raw` files; each file's rounds are
/// renumbered after the previous files' so that rounds of separate runs stay unpaired.
fn table(args: &[String]) -> Result<(), String> {
    if args.is_empty() {
        return Err("table FILE...".into());
    }
    let mut records = Vec::new();
    for path in args {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let first = records
            .iter()
            .map(|r: &table::Record| r.round + 1)
            .max()
            .unwrap_or(0);
        for line in text.lines().filter(|l| !l.is_empty()) {
            let mut r = table::Record::parse(line)?;
            r.round += first;
            records.push(r);
        }
    }
    print!("{}", table::print(&records));
    Ok(())
}

fn info(args: &[String]) -> Result<(), String> {
    let sock = args.first().ok_or("info SOCKET")?;
    let dev = Device::connect(sock, 256, 4096, false)?;
    println!("{:?}", dev.limits()?);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("info") => info(&args[1..]),
        Some("table") => table(&args[1..]),
        _ => Err("usage: vhost-client bench|table|info ... (see src/main.rs)".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-client: {e}");
            ExitCode::FAILURE
        }
    }
}
