//! A storage that simulates a crash, for crash-consistency tests.
//!
//! [`FaultStorage`] counts every mutating operation (write, zero, discard, resize) and
//! every flush. From operation number `cut` on, it fails everything, as if the process
//! died there. [`FaultStorage::crash_image`] then returns what a disk could hold after
//! the crash: everything flushed before the cut, plus any subset of the writes that were
//! not yet flushed (chosen by a seed), applied in order.

use std::sync::Mutex;

use super::{MemStorage, Storage};
use crate::error::{Error, Result};

/// One mutating operation since the last flush.
#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    ops: u64,
    flushes: u64,
    cut: Option<u64>,
    crashed: bool,
    durable: Vec<u8>,
    pending: Vec<Op>,
}

/// Which unflushed writes survive the crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// All writes issued before the cut reached the disk.
    KeepAll,
    /// None of the writes since the last flush reached the disk.
    DropUnflushed,
    /// Each unflushed write independently survived or not (a reordering disk cache).
    Random(u64),
}

/// An in-memory storage that stops after a set number of operations (see module docs).
#[derive(Debug)]
pub struct FaultStorage {
    live: MemStorage,
    state: Mutex<State>,
}

impl FaultStorage {
    /// Starts from `initial` bytes (treated as durable), crashing at operation `cut`
    /// (0-based; `None` never crashes, which is useful to count operations).
    pub fn new(initial: Vec<u8>, cut: Option<u64>) -> Self {
        Self {
            live: MemStorage::from_vec(initial.clone()),
            state: Mutex::new(State {
                cut,
                durable: initial,
                ..State::default()
            }),
        }
    }

    /// Operations counted so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Flushes counted so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// True once the cut was reached.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// What the disk holds after the crash (or now, if none happened), per `mode`.
    pub fn crash_image(&self, mode: CrashMode) -> Vec<u8> {
        let st = self.lock();
        let mut img = st.durable.clone();
        let mut rng = match mode {
            CrashMode::Random(seed) => seed ^ 0x9e37_79b9_7f4a_7c15,
            _ => 0,
        };
        for op in &st.pending {
            let keep = match mode {
                CrashMode::KeepAll => true,
                CrashMode::DropUnflushed => false,
                CrashMode::Random(_) => {
                    // xorshift64*
                    rng ^= rng >> 12;
                    rng ^= rng << 25;
                    rng ^= rng >> 27;
                    rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 63 == 1
                }
            };
            if keep {
                apply(&mut img, op);
            }
        }
        img
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one operation; fails if the crash point is reached.
    fn step(&self, op: Option<Op>) -> Result<()> {
        let mut st = self.lock();
        if st.crashed || st.cut.is_some_and(|c| st.ops >= c) {
            st.crashed = true;
            return Err(Error::io(
                "injected crash",
                std::io::Error::other("fault-injecting storage stopped"),
            ));
        }
        st.ops += 1;
        match op {
            Some(op) => st.pending.push(op),
            None => {
                st.flushes += 1;
                let pending = std::mem::take(&mut st.pending);
                for op in &pending {
                    apply(&mut st.durable, op);
                }
            }
        }
        Ok(())
    }
}

fn apply(img: &mut Vec<u8>, op: &Op) {
    let grow = |img: &mut Vec<u8>, end: u64| {
        let end = usize::try_from(end).unwrap_or(usize::MAX);
        if end > img.len() {
            img.resize(end, 0);
        }
    };
    match op {
        Op::Write(off, data) => {
            let start = usize::try_from(*off).unwrap_or(usize::MAX);
            grow(img, off + data.len() as u64);
            if let Some(dst) = img.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        Op::Zero(off, len) => {
            grow(img, off + len);
            let start = usize::try_from(*off).unwrap_or(usize::MAX);
            let end = usize::try_from(off + len).unwrap_or(usize::MAX);
            if let Some(dst) = img.get_mut(start..end) {
                dst.fill(0);
            }
        }
        Op::SetLen(len) => img.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
    }
}

impl Storage for FaultStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.crashed() {
            return Err(Error::io(
                "injected crash",
                std::io::Error::other("fault-injecting storage stopped"),
            ));
        }
        self.live.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.step(Some(Op::Write(offset, buf.to_vec())))?;
        self.live.write_all_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        self.live.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.step(Some(Op::SetLen(len)))?;
        self.live.set_len(len)
    }
    fn flush(&self) -> Result<()> {
        self.step(None)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.step(Some(Op::Zero(offset, len)))?;
        self.live.write_zeroes(offset, len)
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.step(Some(Op::Zero(offset, len)))?;
        self.live.write_zeroes_unmap(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // A discard may or may not reach the disk; model it as a zeroing write.
        let end = offset.saturating_add(len).min(self.live.len()?);
        if offset < end {
            self.step(Some(Op::Zero(offset, end - offset)))?;
        }
        self.live.discard(offset, len)
    }
    fn discard_zeroes(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_flushed_and_drops_unflushed() {
        let s = FaultStorage::new(vec![0; 4], Some(3));
        s.write_all_at(&[1], 0).unwrap(); // op 0
        s.flush().unwrap(); // op 1
        s.write_all_at(&[2], 1).unwrap(); // op 2
        assert!(s.write_all_at(&[3], 2).is_err()); // op 3: cut
        assert!(s.crashed());
        assert!(s.flush().is_err());
        assert_eq!(s.crash_image(CrashMode::DropUnflushed), vec![1, 0, 0, 0]);
        assert_eq!(s.crash_image(CrashMode::KeepAll), vec![1, 2, 0, 0]);
        let r = s.crash_image(CrashMode::Random(7));
        assert_eq!(r[0], 1);
        assert_eq!(r[2], 0);
    }

    #[test]
    fn counts_without_cut() {
        let s = FaultStorage::new(Vec::new(), None);
        s.write_all_at(&[1; 10], 0).unwrap();
        s.set_len(5).unwrap();
        s.flush().unwrap();
        assert_eq!(s.ops(), 3);
        assert_eq!(s.crash_image(CrashMode::DropUnflushed), vec![1; 5]);
    }
}
