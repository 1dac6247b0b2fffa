//! [`IoBuf`]: the owned buffer the async face reads into and writes from.

/// Alignment of [`IoBuf::new`]'s buffers: what `O_DIRECT` asks of memory on every
/// common device (qemu's `MAX_BLOCKSIZE`).
pub const IO_ALIGN: usize = 4096;

/// An owned byte buffer for [`AsyncDevice`](crate::AsyncDevice). While a request is in
/// flight the device owns it (the kernel may be writing into it), and the request's
/// future hands it back: no borrow can dangle if a future is dropped early.
/// [`IoBuf::new`] aligns it to [`IO_ALIGN`] bytes, so `O_DIRECT` files take it as it is.
#[derive(Clone, Default)]
pub struct IoBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// `len` zero bytes starting at an [`IO_ALIGN`] boundary.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len.saturating_add(IO_ALIGN)];
        let start = raw.as_ptr().align_offset(IO_ALIGN).min(IO_ALIGN);
        Self { raw, start, len }
    }

    /// The bytes of `v` (aligned as the allocator placed them).
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            raw: v,
            start: 0,
            len,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.raw
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.raw
            .get_mut(self.start..self.start + self.len)
            .unwrap_or_default()
    }

    /// The bytes as a vector (copied out when the buffer is aligned inside a larger one).
    pub fn into_vec(self) -> Vec<u8> {
        match self.start {
            0 => {
                let mut v = self.raw;
                v.truncate(self.len);
                v
            }
            _ => self.as_slice().to_vec(),
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(v: Vec<u8>) -> Self {
        Self::from_vec(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_round_trips() {
        let mut b = IoBuf::new(8192);
        assert_eq!(b.as_slice().as_ptr().align_offset(IO_ALIGN), 0);
        assert_eq!(b.len(), 8192);
        b[10] = 7;
        let v = b.clone().into_vec();
        assert_eq!((v.len(), v[10]), (8192, 7));
        let c = IoBuf::from(vec![1, 2, 3]);
        assert_eq!((&*c, c.is_empty()), (&[1u8, 2, 3][..], false));
        assert_eq!(c.into_vec(), vec![1, 2, 3]);
        assert!(IoBuf::new(0).is_empty());
    }
}
