//! [`Recycler`]: large buffers handed back for reuse instead of freed.
//!
//! The HTTP blocks (4 MiB) and the forward-only chunks (1 MiB) are allocated and freed
//! over and over by several threads. glibc serves such sizes with `mmap` only until the
//! first one is freed (its threshold then rises to that size), after which they come
//! from per-thread heap arenas that keep freed memory: on a 4 GiB URL conversion that
//! added about 45 MiB to the peak RSS (123 MiB against 78 MiB with a fixed threshold,
//! docs/benchmarks.md). Reusing the buffers keeps the peak at what is in use.

use std::sync::{Arc, Mutex};

/// A bounded stack of spare buffers, shared by the threads that make and drop them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Recycler {
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl Recycler {
    /// A recycler keeping at most `keep` spare buffers.
    pub(crate) fn new(keep: usize) -> Self {
        Self {
            spare: Arc::default(),
            keep,
        }
    }

    /// A buffer of `len` bytes: a spare one when there is one (its old bytes are left,
    /// the caller overwrites them), else a new zeroed one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match spare {
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    /// Hands `buf` back (dropped when enough are spare already).
    pub(crate) fn give(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut s = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() < self.keep {
            s.push(buf);
        }
    }
}

/// A buffer that goes back to its [`Recycler`] when dropped (the HTTP cache's blocks,
/// shared through `Arc` by the readers copying out of them).
#[derive(Debug)]
pub(crate) struct Recycled {
    buf: Vec<u8>,
    home: Recycler,
}

impl Recycled {
    /// Wraps `buf`, to be handed back to `home`.
    pub(crate) fn new(buf: Vec<u8>, home: &Recycler) -> Self {
        Self {
            buf,
            home: home.clone(),
        }
    }
}

impl std::ops::Deref for Recycled {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.home.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_up_to_the_bound() {
        let r = Recycler::new(1);
        let a = r.take(8);
        assert_eq!(a, vec![0; 8]);
        let p = a.as_ptr();
        drop(Recycled::new(a, &r));
        let b = r.take(4);
        assert_eq!((b.len(), b.as_ptr()), (4, p));
        r.give(b);
        r.give(vec![1; 4]);
        assert_eq!(r.spare.lock().unwrap().len(), 1);
    }
}
