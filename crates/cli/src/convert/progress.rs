//! `convert -p`: the progress records qemu-img prints, replayed from the sources' block
//! status, independent of how the parallel copy schedules its chunks.
//!
//! qemu-img (`convert_do_copy` in qemu-img.c) walks the sources twice with
//! `convert_iteration_sectors`: once to count the sectors it will copy (data, and zeroes
//! with `-S 0`), then again as it copies, printing `100 * done / allocated` after every
//! counted step through `qemu_progress_print` (which drops steps of 1 % or less). A
//! step is what one block-status query returns, cut
//! - at `BDRV_REQUEST_MAX_SECTORS` per query and at the end of each source;
//! - at the source's cluster alignment (`tail`: a run ends on a cluster boundary unless
//!   it is shorter than the misalignment);
//! - for data, at the copy buffer (2 MiB);
//! - for compressed targets, at the target's cluster: a shorter run counts as a whole
//!   data cluster, a longer one is rounded down to clusters;
//! - with `-B`, at the end of the target's backing file.
//!
//! Each driver's block status ends runs where qemu's does (see [`Rules`]): qcow2 at the
//! end of an L2 table and after each compressed cluster, VMDK at each grain, VDI at each
//! block, VPC after each allocated block; VHDX and LUKS report all data. [`Schedule`]
//! replays the same steps from our own map and feeds their values to [`Progress`] as
//! the copy passes each step's end, so the records are qemu's for the same image.

use std::sync::Arc;

use anyhow::Result;
use diskimg::blockio::ExtentKind;
use diskimg::{BlockDevice, Image};

use crate::common::Progress;

const SECTOR: u64 = 512;
/// `BDRV_REQUEST_MAX_SECTORS`: `INT_MAX >> BDRV_SECTOR_BITS`.
const MAX_REQUEST: u64 = (i32::MAX as u64) >> 9;
/// `IO_BUF_SIZE` of qemu-img.c, in sectors.
const BUF: u64 = 4096;

/// qemu's `ImgConvertBlockStatus`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    Data,
    Zero,
    BackingFile,
}

/// What the target and the flags make of the walk.
pub(super) struct Setup<'a> {
    /// The sources, in order.
    pub(super) parts: &'a [Arc<dyn BlockDevice>],
    /// The target device (its format and cluster size; not kept: the target is closed
    /// and reopened for `--bitmaps` while the records go on).
    pub(super) target: &'a dyn BlockDevice,
    /// `-c`, or a target that only takes compressed writes.
    pub(super) compress: bool,
    /// `-S 0`: zeroes are written, and counted.
    pub(super) count_zeroes: bool,
    /// The target has a backing file (`-B`): the walk stops at each source's backing.
    pub(super) target_has_backing: bool,
    /// The size of a new target's backing file (bytes).
    pub(super) target_backing: Option<u64>,
}

/// How one layer's driver ends its block-status runs (qemu's `bdrv_co_block_status`).
#[derive(Clone, Copy)]
enum Rules {
    /// No block status: everything is data (vhdx, luks).
    AllData,
    /// Runs end at the end of each L2 table; a compressed cluster is a run of its own.
    Qcow2 { cluster: u64, l2_span: u64 },
    /// Runs end at every grain / block boundary (vmdk, vdi).
    PerCluster(u64),
    /// Allocated runs end at their block's end (vpc).
    DataPerBlock(u64),
    /// As the map reports them (raw: the host file's holes).
    Map,
}

impl Rules {
    fn of(dev: &dyn BlockDevice) -> Self {
        let info = dev.info();
        let cs = info.cluster_size.filter(|&c| c >= SECTOR);
        match (info.format, cs) {
            ("vhdx" | "luks", _) => Rules::AllData,
            ("qcow2", Some(c)) => {
                let extended = info.format_specific.iter().any(|(_, v)| {
                    v.iter().any(|(k, v)| {
                        k == "extended-l2" && matches!(v, diskimg::blockio::InfoValue::Bool(true))
                    })
                });
                let entries = c / if extended { 16 } else { 8 };
                Rules::Qcow2 {
                    cluster: c,
                    l2_span: entries.saturating_mul(c),
                }
            }
            ("vmdk" | "vdi", Some(c)) => Rules::PerCluster(c),
            ("vpc", Some(c)) => Rules::DataPerBlock(c),
            _ => Rules::Map,
        }
    }
}

/// Bytes from `off` to the next multiple of `unit`.
fn to_boundary(off: u64, unit: u64) -> u64 {
    unit - off % unit
}

/// One layer's status at `off` (at most `len` bytes): `None` when unallocated.
fn layer_status(
    dev: &dyn BlockDevice,
    rules: Rules,
    off: u64,
    len: u64,
) -> Result<(Option<Status>, u64)> {
    if let Rules::AllData = rules {
        return Ok((Some(Status::Data), len));
    }
    let e = dev.map(off, len)?;
    let n = e.len.min(len).max(1);
    let (st, compressed) = match e.kind {
        ExtentKind::Data { .. } => (Some(Status::Data), false),
        ExtentKind::Compressed => (Some(Status::Data), true),
        ExtentKind::Zero { .. } | ExtentKind::DataZero { .. } => (Some(Status::Zero), false),
        ExtentKind::Unallocated { .. } => (None, false),
    };
    let limit = match rules {
        Rules::Qcow2 { cluster, .. } if compressed => to_boundary(off, cluster),
        Rules::Qcow2 { l2_span, .. } => to_boundary(off, l2_span.max(1)),
        Rules::PerCluster(c) => to_boundary(off, c),
        Rules::DataPerBlock(c) if st == Some(Status::Data) => to_boundary(off, c),
        _ => u64::MAX,
    };
    Ok((st, n.min(limit)))
}

/// One source with its backing chain and the walk's alignment for it.
struct Part {
    chain: Vec<(Arc<dyn BlockDevice>, Rules)>,
    /// Start in the concatenation, in sectors.
    start: u64,
    /// Size in bytes.
    size: u64,
    /// `src_alignment`: the cluster size in sectors (at least 1).
    align: u64,
}

impl Part {
    fn new(dev: &Arc<dyn BlockDevice>, start: u64) -> Self {
        let mut chain = Vec::new();
        let mut cur = Some(dev.clone());
        while let Some(d) = cur {
            // A chain deeper than this is refused at open; the bound is a safety net.
            if chain.len() > 4096 {
                break;
            }
            cur = d.backing_device();
            let r = Rules::of(d.as_ref());
            chain.push((d, r));
        }
        let align = dev.info().cluster_size.map_or(1, |c| c / SECTOR).max(1);
        Part {
            chain,
            start,
            size: dev.virtual_size(),
            align,
        }
    }

    /// `bdrv_block_status_above` from the top (down to the top's backing when
    /// `top_only`), as convert reads it.
    fn status(&self, off: u64, len: u64, top_only: bool) -> Result<(Status, u64)> {
        let mut len = len;
        for (depth, (dev, rules)) in self.chain.iter().enumerate() {
            let (st, n) = layer_status(dev.as_ref(), *rules, off, len)?;
            len = n;
            if let Some(st) = st {
                return Ok((st, len));
            }
            match self.chain.get(depth + 1) {
                // Past a shorter backing file: zeroes of this layer.
                Some((b, _)) if off >= b.virtual_size() => return Ok((Status::Zero, len)),
                Some(_) if top_only => return Ok((Status::BackingFile, len)),
                Some((b, _)) => len = len.min(b.virtual_size() - off),
                None => return Ok((Status::Zero, len)),
            }
        }
        Ok((Status::Zero, len))
    }
}

/// The walk's fixed parameters (`ImgConvertState`'s), sizes in sectors.
struct Params {
    parts: Vec<Part>,
    total: u64,
    /// `buf_sectors`.
    buf: u64,
    /// Compressed target: its cluster (`cluster_sectors`); 0 otherwise.
    cluster: u64,
    /// `min_sparse == 0`.
    count_zeroes: bool,
    /// `target_has_backing`.
    top_only: bool,
    /// `target_backing_sectors`.
    backing: Option<u64>,
}

/// The walk's position and the status of the run it is in.
struct Walk {
    sector: u64,
    status: Status,
    next_status: u64,
}

impl Params {
    /// `convert_iteration_sectors`: the length of the step at `w.sector`.
    fn step(&self, w: &mut Walk) -> Result<u64> {
        let sector = w.sector;
        let part = self
            .parts
            .iter()
            .find(|p| sector < p.start + p.size.div_ceil(SECTOR))
            .ok_or_else(|| anyhow::anyhow!("progress walk past the sources"))?;
        let mut n = (self.total - sector).min(MAX_REQUEST);
        let mut post_backing_zero = false;
        if let Some(b) = self.backing {
            if sector >= b {
                post_backing_zero = true;
            } else if sector + n > b {
                n = b - sector;
            }
        }
        if w.next_status <= sector {
            let off = (sector - part.start) * SECTOR;
            let count = (n * SECTOR).min(part.size - off);
            let (st, len) = part.status(off, count, self.top_only)?;
            n = len.div_ceil(SECTOR).max(1);
            let tail = (sector - part.start + n) % part.align;
            if n > tail {
                n -= tail;
            }
            w.status = match st {
                Status::Zero if post_backing_zero => Status::BackingFile,
                s => s,
            };
            w.next_status = sector + n;
        }
        n = n.min(w.next_status - sector);
        if w.status == Status::Data {
            n = n.min(self.buf);
        }
        if self.cluster > 0 {
            if n < self.cluster {
                n = self.cluster.min(self.total - sector);
                w.status = Status::Data;
            } else {
                n -= n % self.cluster;
            }
        }
        Ok(n)
    }

    /// Whether qemu counts a step of this status.
    fn counted(&self, st: Status) -> bool {
        st == Status::Data || (self.count_zeroes && st == Status::Zero)
    }
}

/// qemu's progress steps for one conversion, handed to [`Progress`] as the copy advances.
pub(super) struct Schedule {
    params: Params,
    walk: Walk,
    /// `allocated_sectors`: the sum of the counted steps.
    allocated: u64,
    /// `allocated_done`.
    done: u64,
    /// The computed step not yet passed by the copy: (end sector, counted sectors).
    pending: Option<(u64, u64)>,
    /// A block-status error after the first walk: no more records but the final one.
    failed: bool,
}

impl Schedule {
    /// Walks the sources once, as qemu does before copying, to count the sectors.
    pub(super) fn new(s: &Setup<'_>) -> Result<Self> {
        let mut start = 0u64;
        let mut parts = Vec::new();
        for d in s.parts {
            let p = Part::new(d, start);
            start += p.size.div_ceil(SECTOR);
            parts.push(p);
        }
        let ti = s.target.info();
        let tcluster = ti.cluster_size.unwrap_or(0) / SECTOR;
        // qemu raises the buffer to the target's discard alignment: a qcow2 cluster, at
        // most 2 MiB (the default), so it stays at 2 MiB.
        let mut buf = BUF;
        let cluster = if s.compress { tcluster } else { 0 };
        if cluster > 0 {
            buf = cluster;
        }
        let params = Params {
            parts,
            total: start,
            buf,
            cluster,
            count_zeroes: s.count_zeroes,
            top_only: s.target_has_backing,
            backing: s.target_backing.map(|b| b.div_ceil(SECTOR)),
        };
        let mut walk = Walk {
            sector: 0,
            status: Status::Data,
            next_status: 0,
        };
        let mut allocated = 0u64;
        while walk.sector < params.total {
            let n = params.step(&mut walk)?;
            if params.counted(walk.status) {
                allocated += n;
            }
            walk.sector += n;
        }
        walk.sector = 0;
        walk.next_status = 0;
        Ok(Schedule {
            params,
            walk,
            allocated,
            done: 0,
            pending: None,
            failed: false,
        })
    }

    /// Prints the records of the steps that end at or before guest byte `pos`.
    pub(super) fn advance(&mut self, pos: u64, bar: &Progress) {
        while !self.failed {
            let (end, n) = match self.pending {
                Some(p) => p,
                None if self.walk.sector >= self.params.total => return,
                None => match self.next() {
                    Ok(p) => p,
                    Err(_) => {
                        self.failed = true;
                        return;
                    }
                },
            };
            if end.saturating_mul(SECTOR) > pos {
                self.pending = Some((end, n));
                return;
            }
            self.pending = None;
            if n > 0 {
                self.done += n;
                bar.fraction(self.done, self.allocated);
            }
        }
    }

    /// The copy loop's next step: (end sector, sectors counted).
    fn next(&mut self) -> Result<(u64, u64)> {
        let p = &self.params;
        let mut n = p.step(&mut self.walk)?;
        if p.count_zeroes && self.walk.status == Status::Zero {
            n = n.min(p.buf);
        }
        self.walk.sector += n;
        let counted = if p.counted(self.walk.status) { n } else { 0 };
        Ok((self.walk.sector, counted))
    }
}

/// How `convert` reports: qemu's steps, or (a stream source, which reports the input
/// read, or a walk that failed) the copy's own `(done, total)`.
pub(super) struct Reporter<'a> {
    bar: &'a Progress,
    images: &'a [Image],
    schedule: Option<Schedule>,
}

impl<'a> Reporter<'a> {
    /// Walks the sources first when records are printed at all.
    pub(super) fn new(bar: &'a Progress, images: &'a [Image], setup: &Setup<'_>) -> Self {
        let schedule = (bar.enabled() && !super::pipe::streamed(images))
            .then(|| Schedule::new(setup).ok())
            .flatten();
        Reporter {
            bar,
            images,
            schedule,
        }
    }

    /// The copy has done `done` of `total` bytes.
    pub(super) fn update(&mut self, done: u64, total: u64) {
        match &mut self.schedule {
            Some(s) => s.advance(done, self.bar),
            None => {
                let (d, t) = super::pipe::progress(self.images, done, total);
                if d > 0 && d < t {
                    self.bar.fraction(d, t);
                }
            }
        }
    }

    /// The copy loop's last records (`copied`: without a schedule, whether the copy
    /// wrote anything qemu counts), before the final 100 %.
    pub(super) fn finish(&mut self, copied: bool) {
        match &mut self.schedule {
            Some(s) => s.advance(u64::MAX, self.bar),
            None if copied => self.bar.print(100.0, 0),
            None => {}
        }
    }
}
