//! Rounds, server CPU time and the table.

use crate::Target;
use crate::load::{self, Case, Rw, Stats};
use std::time::Duration;

/// A server's CPU time so far (user + system, all threads), from /proc/PID/stat.
fn cpu(pid: Option<u32>) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI this runs on.
    Some(Duration::from_millis(ticks * 10))
}

#[derive(Default, Clone)]
struct Cell {
    rates: Vec<f64>,
    cpu: Duration,
    ios: u64,
    requests: u64,
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

/// Runs every case in `rounds` rounds on every target and prints the table.
pub fn run(
    ts: &mut [Target],
    cases: &[Case],
    size: u64,
    secs: f64,
    rounds: usize,
) -> Result<(), String> {
    let n = ts.len();
    let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
    let mut head = format!("| test | {} |", names.join(" | "));
    for t in &names[..n - 1] {
        head += &format!(" {t}: ratio | per-round ratios |");
    }
    head += &format!(
        " server CPU µs per I/O: {} | requests per I/O |",
        names.join(" / ")
    );
    println!("{head}");
    println!("{}|", "|---".repeat(head.matches('|').count() - 1));
    let mut turn = 0;
    for &case in cases {
        let mut cells = vec![Cell::default(); n];
        for _ in 0..rounds {
            for k in 0..n {
                let i = (k + turn) % n;
                let t = &mut ts[i];
                let c0 = cpu(t.pid);
                let s = load::run(&mut t.dev, case, t.shape, size, secs)
                    .map_err(|e| format!("{}: {e}", t.name))?;
                if let (Some(a), Some(b)) = (c0, cpu(t.pid)) {
                    cells[i].cpu += b.saturating_sub(a);
                }
                cells[i].rates.push(rate(case, &s));
                cells[i].ios += s.ios;
                cells[i].requests += s.requests;
            }
            turn += 1;
        }
        let unit = if case.bs == 4096 { "IOPS" } else { "MiB/s" };
        let mut row = format!("| {} ({unit}) |", name(case));
        for c in &cells {
            row += &format!(" {:.0} |", median(&c.rates));
        }
        let r = &cells[n - 1].rates;
        for c in &cells[..n - 1] {
            let mut per: Vec<f64> = c
                .rates
                .iter()
                .zip(r)
                .map(|(a, b)| a / b.max(1e-9))
                .collect();
            per.sort_by(f64::total_cmp);
            let m = median(&c.rates) / median(r).max(1e-9);
            row += &format!(" {m:.2}x | {:.2}–{:.2} |", per[0], per[per.len() - 1]);
        }
        let us: Vec<String> = cells
            .iter()
            .zip(ts.iter())
            .map(|(c, t)| match t.pid {
                Some(_) => format!("{:.1}", c.cpu.as_secs_f64() * 1e6 / c.ios.max(1) as f64),
                None => "-".into(),
            })
            .collect();
        let rq: Vec<String> = cells
            .iter()
            .map(|c| format!("{:.2}", c.requests as f64 / c.ios.max(1) as f64))
            .collect();
        row += &format!(" {} | {} |", us.join(" / "), rq.join(" / "));
        println!("{row}");
    }
    Ok(())
}
