//! One fio-like run against one device: random or sequential reads or writes of one block
//! size at one queue depth for a fixed time. Each I/O is cut into virtio requests as a
//! Linux guest's block layer cuts a bio: data segments of at most one page (a guest's
//! user buffer is rarely physically contiguous: the guest sent 258-descriptor requests
//! for 1 MiB) and no more segments per request than the device's `seg_max`.

use diskimg_vhost_client::dev::{Device, Done, Limits, Seg};
use std::time::{Duration, Instant};

/// The access pattern of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    /// Random reads (fio `randread`).
    RandRead,
    /// Random writes (fio `randwrite`).
    RandWrite,
    /// Sequential reads (fio `read`).
    Read,
    /// Sequential writes (fio `write`).
    Write,
}

/// One row of the benchmark: pattern, block size, queue depth.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// The access pattern.
    pub rw: Rw,
    /// Bytes per I/O.
    pub bs: usize,
    /// I/Os in flight.
    pub qd: usize,
}

impl Case {
    /// Parses `RW-BS-QD` (serve-vhost.sh's case names, e.g. `randread-4k-16`).
    pub fn parse(s: &str) -> Result<Case, String> {
        let mut p = s.split('-');
        let (rw, bs, qd) = match (p.next(), p.next(), p.next(), p.next()) {
            (Some(a), Some(b), Some(c), None) => (a, b, c),
            _ => return Err(format!("case {s}: want RW-BS-QD")),
        };
        let rw = match rw {
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "read" => Rw::Read,
            "write" => Rw::Write,
            _ => return Err(format!("case {s}: unknown pattern {rw}")),
        };
        let bs = match bs {
            "4k" => 4096,
            "64k" => 65536,
            "1M" => 1 << 20,
            _ => return Err(format!("case {s}: block size 4k, 64k or 1M")),
        };
        let qd = qd
            .parse()
            .map_err(|_| format!("case {s}: bad queue depth"))?;
        if qd == 0 || qd > 256 {
            return Err(format!("case {s}: queue depth 1..=256"));
        }
        Ok(Case { rw, bs, qd })
    }

    /// Whether the case writes.
    pub fn writes(&self) -> bool {
        matches!(self.rw, Rw::RandWrite | Rw::Write)
    }
}

/// What one run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// I/Os completed.
    pub ios: u64,
    /// Virtio requests completed (more than `ios` when the device's limits cut I/Os).
    pub requests: u64,
    /// From the first submission to the last completion.
    pub elapsed: Duration,
}

/// How I/Os are cut into requests on one device.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Bytes per data segment.
    pub seg: usize,
    /// Segments per request.
    pub segs: usize,
}

impl Shape {
    /// A guest's cut on a device with these limits: page-sized segments (smaller if the
    /// device's `size_max` is), at most `seg_max` of them and `max_transfer` bytes.
    pub fn guest(l: &Limits, page: usize) -> Shape {
        let seg = match l.max_segment_len {
            0 => page,
            m => page.min(m),
        };
        let mut segs = l.max_segments.max(1);
        if l.max_transfer > 0 {
            segs = segs.min((l.max_transfer / seg).max(1));
        }
        Shape { seg, segs }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `case` on `dev` for `secs`, over the first `size` bytes of the device.
pub fn run(
    dev: &mut Device,
    case: Case,
    shape: Shape,
    size: u64,
    secs: f64,
) -> Result<Stats, String> {
    let bs = case.bs as u64;
    let blocks = size / bs;
    if blocks == 0 {
        return Err(format!("device smaller than one {bs}-byte block"));
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ blocks);
    let mut seq = 0u64;
    // Requests still pending per I/O slot.
    let mut pending = vec![0usize; case.qd];
    let mut stats = Stats::default();
    let mut done: Vec<Done> = Vec::new();
    let start = Instant::now();
    let stop = start + Duration::from_secs_f64(secs);
    for (slot, p) in pending.iter_mut().enumerate() {
        *p = submit(
            dev,
            case,
            shape,
            slot,
            next_block(case, &mut rng, &mut seq, blocks),
        )?;
    }
    let mut last = start;
    while dev.inflight() > 0 {
        done.clear();
        dev.wait(1, &mut done)?;
        let now = Instant::now();
        for d in &done {
            if d.ret != 0 {
                return Err(format!("request failed: errno {}", -d.ret));
            }
            stats.requests += 1;
            let p = pending
                .get_mut(d.tag)
                .ok_or("completion for an unknown slot")?;
            *p = p.saturating_sub(1);
            if *p == 0 {
                stats.ios += 1;
                last = now;
                if now < stop {
                    let b = next_block(case, &mut rng, &mut seq, blocks);
                    *p = submit(dev, case, shape, d.tag, b)?;
                }
            }
        }
    }
    stats.elapsed = last - start;
    Ok(stats)
}

fn next_block(case: Case, rng: &mut Rng, seq: &mut u64, blocks: u64) -> u64 {
    match case.rw {
        Rw::RandRead | Rw::RandWrite => rng.next() % blocks,
        Rw::Read | Rw::Write => {
            let b = *seq % blocks;
            *seq += 1;
            b
        }
    }
}

/// Queues I/O `slot` (its buffer is the slot's `bs` bytes) at `block`: one or more
/// requests; returns how many.
fn submit(
    dev: &mut Device,
    case: Case,
    shape: Shape,
    slot: usize,
    block: u64,
) -> Result<usize, String> {
    let base = slot * case.bs;
    let mut off = 0usize;
    let mut n = 0;
    let mut segs = Vec::new();
    while off < case.bs {
        segs.clear();
        let req_start = off;
        while off < case.bs && segs.len() < shape.segs {
            let len = shape.seg.min(case.bs - off);
            segs.push(Seg {
                off: base + off,
                len,
            });
            off += len;
        }
        let at = block * case.bs as u64 + req_start as u64;
        if case.writes() {
            dev.write(at, &segs, slot)?;
        } else {
            dev.read(at, &segs, slot)?;
        }
        n += 1;
    }
    Ok(n)
}
