//! Rounds, server CPU time and the table.
//!
//! Every measurement is a [`Record`]: one case on one target in one round. `bench` prints
//! the table of its own records and, with `--raw FILE`, appends them to FILE, so that
//! several runs (benches/serve-vhost-host.sh runs one per rotation of the image copies
//! among the servers) make one table with `vhost-client table FILE`.

use crate::Target;
use crate::load::{self, Case, Rw, Stats};
use std::fmt::Write as _;
use std::time::Duration;

/// A server's CPU time so far (user + system, all threads), from /proc/PID/stat.
fn cpu(pid: Option<u32>) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI this runs on.
    Some(Duration::from_millis(ticks * 10))
}

/// One case on one target in one round.
#[derive(Clone, Debug)]
pub struct Record {
    /// The case's row name (`read 1M QD1`).
    pub case: String,
    /// The target's column name.
    pub target: String,
    /// The round (pairs a target's rate with the reference's for per-round ratios).
    pub round: usize,
    /// IOPS (4 KiB rows) or MiB/s.
    pub rate: f64,
    /// The server's CPU time over the run in µs, when its pid was given.
    pub cpu_us: Option<f64>,
    /// I/Os completed.
    pub ios: u64,
    /// Virtio requests completed.
    pub requests: u64,
}

impl Record {
    /// The tab-separated line `--raw` appends.
    pub fn line(&self) -> String {
        let cpu = self.cpu_us.map_or("-".into(), |c| format!("{c:.0}"));
        format!(
            "{}\t{}\t{}\t{}\t{cpu}\t{}\t{}",
            self.case, self.target, self.round, self.rate, self.ios, self.requests
        )
    }

    /// Parses a line written by [`Record::line`].
    pub fn parse(line: &str) -> Result<Self, String> {
        let f: Vec<&str> = line.split('\t').collect();
        let [case, target, round, rate, cpu, ios, requests] = f[..] else {
            return Err(format!("bad record: {line}"));
        };
        let bad = |what: &str| format!("bad {what} in record: {line}");
        Ok(Record {
            case: case.into(),
            target: target.into(),
            round: round.parse().map_err(|_| bad("round"))?,
            rate: rate.parse().map_err(|_| bad("rate"))?,
            cpu_us: match cpu {
                "-" => None,
                c => Some(c.parse().map_err(|_| bad("cpu"))?),
            },
            ios: ios.parse().map_err(|_| bad("ios"))?,
            requests: requests.parse().map_err(|_| bad("requests"))?,
        })
    }
}

fn rate(case: Case, s: &Stats) -> f64 {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    if case.bs == 4096 {
        s.ios as f64 / secs
    } else {
        s.ios as f64 * case.bs as f64 / secs / (1 << 20) as f64
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn name(c: Case) -> String {
    let rw = match c.rw {
        Rw::RandRead => "randread",
        Rw::RandWrite => "randwrite",
        Rw::Read => "read",
        Rw::Write => "write",
    };
    let bs = if c.bs >= 1 << 20 {
        format!("{}M", c.bs >> 20)
    } else {
        format!("{}k", c.bs >> 10)
    };
    format!("{rw} {bs} QD{}", c.qd)
}

/// Runs every case in `rounds` rounds (numbered from `first_round`) on every target,
/// the first target rotating, and returns the records.
pub fn run(
    ts: &mut [Target],
    cases: &[Case],
    size: u64,
    secs: f64,
    rounds: usize,
    first_round: usize,
) -> Result<Vec<Record>, String> {
    let n = ts.len();
    let mut out = Vec::new();
    let mut turn = 0;
    for &case in cases {
        for r in 0..rounds {
            for k in 0..n {
                let t = &mut ts[(k + turn) % n];
                let c0 = cpu(t.pid);
                let s = load::run(&mut t.dev, case, t.shape, size, secs)
                    .map_err(|e| format!("{}: {e}", t.name))?;
                let cpu_us = match (c0, cpu(t.pid)) {
                    (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() * 1e6),
                    _ => None,
                };
                out.push(Record {
                    case: name(case),
                    target: t.name.clone(),
                    round: first_round + r,
                    rate: rate(case, &s),
                    cpu_us,
                    ios: s.ios,
                    requests: s.requests,
                });
            }
            turn += 1;
        }
    }
    Ok(out)
}

/// The names in `v` in the order they first appear.
fn firsts<'a>(v: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for s in v {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// The markdown table of `records`: per case, each target's median rate, its ratio to
/// the last target's (with the range of per-round ratios), CPU µs and requests per I/O.
pub fn print(records: &[Record]) -> String {
    let names = firsts(records.iter().map(|r| r.target.as_str()));
    let cases = firsts(records.iter().map(|r| r.case.as_str()));
    let Some((&reference, others)) = names.split_last() else {
        return String::new();
    };
    let mut t = format!("| test | {} |", names.join(" | "));
    for n in others {
        t += &format!(" {n}: ratio | per-round ratios |");
    }
    t += &format!(
        " server CPU µs per I/O: {} | requests per I/O |\n",
        names.join(" / ")
    );
    let cols = t.matches('|').count() - 1;
    t += &format!("{}|\n", "|---".repeat(cols));
    for case in cases {
        let of = |n: &str| -> Vec<&Record> {
            let mut v: Vec<&Record> = records
                .iter()
                .filter(|r| r.case == case && r.target == n)
                .collect();
            v.sort_by_key(|r| r.round);
            v
        };
        let rates = |v: &[&Record]| v.iter().map(|r| r.rate).collect::<Vec<f64>>();
        let unit = if case.contains(" 4k ") {
            "IOPS"
        } else {
            "MiB/s"
        };
        let _ = write!(t, "| {case} ({unit}) |");
        for n in &names {
            let _ = write!(t, " {:.0} |", median(&rates(&of(n))));
        }
        let refs = of(reference);
        let m_ref = median(&rates(&refs)).max(1e-9);
        for n in others {
            let mine = of(n);
            let mut per: Vec<f64> = mine
                .iter()
                .filter_map(|a| {
                    let b = refs.iter().find(|b| b.round == a.round)?;
                    Some(a.rate / b.rate.max(1e-9))
                })
                .collect();
            per.sort_by(f64::total_cmp);
            let (lo, hi) = (per.first().copied(), per.last().copied());
            let m = median(&rates(&mine)) / m_ref;
            let _ = write!(
                t,
                " {m:.2}x | {:.2}–{:.2} |",
                lo.unwrap_or(f64::NAN),
                hi.unwrap_or(f64::NAN)
            );
        }
        let mut us = Vec::new();
        let mut rq = Vec::new();
        for n in &names {
            let v = of(n);
            let ios = v.iter().map(|r| r.ios).sum::<u64>().max(1) as f64;
            let cpu: Option<f64> = v.iter().map(|r| r.cpu_us).sum();
            us.push(cpu.map_or("-".into(), |c| format!("{:.1}", c / ios)));
            let reqs = v.iter().map(|r| r.requests).sum::<u64>() as f64;
            rq.push(format!("{:.2}", reqs / ios));
        }
        let _ = writeln!(t, " {} | {} |", us.join(" / "), rq.join(" / "));
    }
    t
}
