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

/// The geometric mean of paired per-round ratios `per` and its 95 % confidence interval
/// (Student's t on the logarithms: rounds are paired in time, so the disk's drift from
/// minute to minute, which moves both servers, cancels out of each ratio).
fn paired(per: &[f64]) -> (f64, f64, f64) {
    let logs: Vec<f64> = per.iter().filter(|r| **r > 0.0).map(|r| r.ln()).collect();
    let n = logs.len();
    if n < 2 {
        let g = logs.first().map_or(f64::NAN, |l| l.exp());
        return (g, f64::NAN, f64::NAN);
    }
    let mean = logs.iter().sum::<f64>() / n as f64;
    let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t95(n - 1) * (var / n as f64).sqrt();
    (mean.exp(), (mean - half).exp(), (mean + half).exp())
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    match df {
        0 => f64::NAN,
        1..=10 => T[df - 1],
        11..=20 => 2.1,
        21..=40 => 2.03,
        _ => 1.98,
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
/// the last target's (with the range of per-round ratios, and their geometric mean with
/// its 95 % confidence interval), CPU µs and requests per I/O.
pub fn print(records: &[Record]) -> String {
    let names = firsts(records.iter().map(|r| r.target.as_str()));
    let cases = firsts(records.iter().map(|r| r.case.as_str()));
    let Some((&reference, others)) = names.split_last() else {
        return String::new();
    };
    let mut t = format!("| test | {} |", names.join(" | "));
    for n in others {
        t += &format!(" {n}: ratio | per-round ratios | paired geomean (95% CI) |");
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
            let (g, g_lo, g_hi) = paired(&per);
            let _ = write!(
                t,
                " {m:.2}x | {:.2}–{:.2} | {g:.3}x ({g_lo:.3}–{g_hi:.3}) |",
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

#[cfg(test)]
mod tests {
    use super::paired;

    #[test]
    fn paired_geomean_and_interval() {
        let (g, lo, hi) = paired(&[0.5, 2.0]);
        assert!((g - 1.0).abs() < 1e-12);
        assert!(lo < 1.0 && hi > 1.0);
        let (g, lo, hi) = paired(&[1.1, 1.1, 1.1]);
        assert!((g - 1.1).abs() < 1e-12 && (lo - 1.1).abs() < 1e-12 && (hi - 1.1).abs() < 1e-12);
        let (g, lo, hi) = paired(&[1.05, 1.10, 1.15, 1.08, 1.12, 1.09]);
        assert!(lo > 1.0 && lo < g && g < hi);
        assert!(paired(&[1.2]).1.is_nan());
    }
}
