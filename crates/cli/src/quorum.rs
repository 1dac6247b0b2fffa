//! qemu's `quorum` protocol node for `json:` names: the same bytes kept in several files.
//! A read returns what at least `vote-threshold` children agree on (EIO when no version
//! has that many votes); a write goes to every child and succeeds when at least
//! `vote-threshold` of them took it. The children must be equally long. A format opened
//! on it has no directory of its own, so relative backing names cannot be resolved
//! (qemu: "cannot determine actual path").

use std::sync::Arc;

use diskimg::{Result, Storage};

/// A quorum of host files.
#[derive(Debug)]
pub(crate) struct QuorumStorage {
    children: Vec<Arc<dyn Storage>>,
    threshold: usize,
}

fn eio() -> diskimg::Error {
    std::io::Error::from_raw_os_error(5).into()
}

impl QuorumStorage {
    /// A quorum of `children` that needs `threshold` votes (1 ≤ threshold ≤ children).
    pub(crate) fn new(children: Vec<Arc<dyn Storage>>, threshold: usize) -> anyhow::Result<Self> {
        if threshold < 1 || threshold > children.len() {
            anyhow::bail!("threshold may not exceed children count");
        }
        Ok(Self {
            children,
            threshold,
        })
    }

    /// Runs `op` on every child; Ok when at least `threshold` succeeded.
    fn all(&self, op: &dyn Fn(&dyn Storage) -> Result<()>) -> Result<()> {
        let mut ok = 0;
        let mut first_err = None;
        for c in &self.children {
            match op(c.as_ref()) {
                Ok(()) => ok += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if ok < self.threshold => Err(e),
            _ => Ok(()),
        }
    }
}

impl Storage for QuorumStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut versions: Vec<Vec<u8>> = Vec::new();
        for c in &self.children {
            let mut v = vec![0u8; buf.len()];
            if c.read_exact_at(&mut v, offset).is_ok() {
                versions.push(v);
            }
        }
        let winner = versions
            .iter()
            .find(|v| versions.iter().filter(|w| w == v).count() >= self.threshold)
            .ok_or_else(eio)?;
        buf.copy_from_slice(winner);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.all(&|c| c.write_all_at(buf, offset))
    }
    fn len(&self) -> Result<u64> {
        let first = self.children.first().ok_or_else(eio)?.len()?;
        for c in self.children.iter().skip(1) {
            if c.len()? != first {
                return Err(eio());
            }
        }
        Ok(first)
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.all(&|c| c.set_len(len))
    }
    fn flush(&self) -> Result<()> {
        self.all(&|c| c.flush())
    }
    fn is_read_only(&self) -> bool {
        self.children.iter().any(|c| c.is_read_only())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskimg::blockio::MemStorage;

    #[test]
    fn votes_decide_reads_and_writes() {
        let a: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![1u8; 512]));
        let b: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![1u8; 512]));
        let c: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(vec![2u8; 512]));
        let q = QuorumStorage::new(vec![a.clone(), b, c.clone()], 2).unwrap();
        let mut buf = [0u8; 16];
        q.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1u8; 16]);
        // No version with three votes.
        let strict = QuorumStorage::new(vec![a.clone(), c.clone()], 2).unwrap();
        assert!(strict.read_exact_at(&mut buf, 0).is_err());
        q.write_all_at(&[7u8; 16], 0).unwrap();
        let mut got = [0u8; 16];
        c.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, [7u8; 16]);
        assert!(QuorumStorage::new(vec![a], 2).is_err());
    }
}
