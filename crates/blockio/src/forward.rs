//! [`forward_storage!`](crate::forward_storage): the methods of a [`Storage`](crate::Storage)
//! wrapper that only pass the call on to the storage it wraps; and
//! [`read_only_storage!`](crate::read_only_storage): the write side of a storage that
//! refuses writes.
//!
//! A wrapper that watches or changes one or two methods (a test storage counting writes,
//! holding a flush, recording hints) writes those and names the rest in one
//! `forward_storage!(field: method, …)` line inside its `impl Storage`. Only the named
//! methods are forwarded: the others keep the trait's defaults, which route through the
//! wrapper's own methods (the default `write_zeroes` writes zero buffers with the
//! wrapper's `write_all_at`, say), exactly as in a hand-written wrapper.

/// Implements the named [`Storage`](crate::Storage) methods of a wrapper by calling the
/// same method, with the same arguments, on the storage in field `$field` (any type that
/// implements `Storage`, an `Arc<dyn Storage>` included). Use it inside an
/// `impl Storage for …` block, beside the methods the wrapper writes itself.
///
/// Every method of the trait can be named: `read_exact_at`, `write_all_at`,
/// `read_vectored_exact_at`, `write_vectored_all_at`, `len`, `is_empty`, `set_len`,
/// `flush`, `is_read_only`, `write_zeroes`, `write_zeroes_unmap`, `discard`,
/// `discard_zeroes`, `preallocate`, `peek_exact_at`, `next_data`, `next_hole`, `allocated_bytes`,
/// `start_writeback`, `host_file`, `uring` and `plain_read` (Linux) and `debug_event`. Methods not named keep the trait's defaults.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// use diskimg_blockio::{MemStorage, Result, Storage, forward_storage};
///
/// /// Counts the writes that reach a memory storage.
/// #[derive(Debug, Default)]
/// struct Counting {
///     inner: MemStorage,
///     writes: AtomicUsize,
/// }
///
/// impl Storage for Counting {
///     forward_storage!(inner: read_exact_at, len, set_len, flush);
///     fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
///         self.writes.fetch_add(1, Ordering::Relaxed);
///         self.inner.write_all_at(buf, offset)
///     }
/// }
///
/// let s = Counting::default();
/// s.write_all_at(b"boot", 0)?;
/// // The default write_zeroes writes through the wrapper's write_all_at.
/// s.write_zeroes(4, 8)?;
/// assert_eq!((s.len()?, s.writes.load(Ordering::Relaxed)), (12, 2));
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
#[macro_export]
macro_rules! forward_storage {
    ($field:ident: $($method:ident),+ $(,)?) => {
        $($crate::forward_storage!(@one $field $method);)+
    };
    (@one $f:ident read_exact_at) => {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> $crate::Result<()> {
            $crate::Storage::read_exact_at(&self.$f, buf, offset)
        }
    };
    (@one $f:ident write_all_at) => {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> $crate::Result<()> {
            $crate::Storage::write_all_at(&self.$f, buf, offset)
        }
    };
    (@one $f:ident read_vectored_exact_at) => {
        fn read_vectored_exact_at(
            &self,
            bufs: &mut [::std::io::IoSliceMut<'_>],
            offset: u64,
        ) -> $crate::Result<()> {
            $crate::Storage::read_vectored_exact_at(&self.$f, bufs, offset)
        }
    };
    (@one $f:ident write_vectored_all_at) => {
        fn write_vectored_all_at(
            &self,
            bufs: &[::std::io::IoSlice<'_>],
            offset: u64,
        ) -> $crate::Result<()> {
            $crate::Storage::write_vectored_all_at(&self.$f, bufs, offset)
        }
    };
    (@one $f:ident len) => {
        fn len(&self) -> $crate::Result<u64> {
            $crate::Storage::len(&self.$f)
        }
    };
    (@one $f:ident is_empty) => {
        fn is_empty(&self) -> $crate::Result<bool> {
            $crate::Storage::is_empty(&self.$f)
        }
    };
    (@one $f:ident set_len) => {
        fn set_len(&self, len: u64) -> $crate::Result<()> {
            $crate::Storage::set_len(&self.$f, len)
        }
    };
    (@one $f:ident flush) => {
        fn flush(&self) -> $crate::Result<()> {
            $crate::Storage::flush(&self.$f)
        }
    };
    (@one $f:ident is_read_only) => {
        fn is_read_only(&self) -> bool {
            $crate::Storage::is_read_only(&self.$f)
        }
    };
    (@one $f:ident write_zeroes) => {
        fn write_zeroes(&self, offset: u64, len: u64) -> $crate::Result<()> {
            $crate::Storage::write_zeroes(&self.$f, offset, len)
        }
    };
    (@one $f:ident write_zeroes_unmap) => {
        fn write_zeroes_unmap(&self, offset: u64, len: u64) -> $crate::Result<()> {
            $crate::Storage::write_zeroes_unmap(&self.$f, offset, len)
        }
    };
    (@one $f:ident discard) => {
        fn discard(&self, offset: u64, len: u64) -> $crate::Result<()> {
            $crate::Storage::discard(&self.$f, offset, len)
        }
    };
    (@one $f:ident discard_zeroes) => {
        fn discard_zeroes(&self) -> bool {
            $crate::Storage::discard_zeroes(&self.$f)
        }
    };
    (@one $f:ident preallocate) => {
        fn preallocate(
            &self,
            offset: u64,
            len: u64,
            mode: $crate::Preallocation,
        ) -> $crate::Result<()> {
            $crate::Storage::preallocate(&self.$f, offset, len, mode)
        }
    };
    (@one $f:ident peek_exact_at) => {
        fn peek_exact_at(&self, buf: &mut [u8], offset: u64) -> $crate::Result<()> {
            $crate::Storage::peek_exact_at(&self.$f, buf, offset)
        }
    };
    (@one $f:ident next_data) => {
        fn next_data(&self, offset: u64) -> $crate::Result<Option<u64>> {
            $crate::Storage::next_data(&self.$f, offset)
        }
    };
    (@one $f:ident next_hole) => {
        fn next_hole(&self, offset: u64) -> $crate::Result<u64> {
            $crate::Storage::next_hole(&self.$f, offset)
        }
    };
    (@one $f:ident allocated_bytes) => {
        fn allocated_bytes(&self) -> $crate::Result<Option<u64>> {
            $crate::Storage::allocated_bytes(&self.$f)
        }
    };
    (@one $f:ident start_writeback) => {
        fn start_writeback(&self, offset: u64, len: u64) {
            $crate::Storage::start_writeback(&self.$f, offset, len)
        }
    };
    (@one $f:ident host_file) => {
        fn host_file(&self) -> Option<&::std::fs::File> {
            $crate::Storage::host_file(&self.$f)
        }
    };
    (@one $f:ident uring) => {
        #[cfg(target_os = "linux")]
        fn uring(&self) -> Option<&$crate::UringStorage> {
            $crate::Storage::uring(&self.$f)
        }
    };
    (@one $f:ident plain_read) => {
        #[cfg(target_os = "linux")]
        fn plain_read(&self, offset: u64, len: u64) -> Option<$crate::PlainRead<'_>> {
            $crate::Storage::plain_read(&self.$f, offset, len)
        }
    };
    (@one $f:ident debug_event) => {
        fn debug_event(&self, event: $crate::DebugEvent) {
            $crate::Storage::debug_event(&self.$f, event)
        }
    };
}

/// The write side of a read-only [`Storage`](crate::Storage), inside its `impl Storage`:
/// `write_all_at` and `set_len` fail with [`Error::ReadOnly`](crate::Error::ReadOnly),
/// `flush` does nothing, `is_read_only` is true. The other write methods keep the
/// trait's defaults (which write through the refused `write_all_at`/`set_len`, or do
/// nothing).
///
/// ```
/// use diskimg_blockio::{Error, Result, Storage, read_only_storage};
///
/// /// A storage of `n` zero bytes.
/// #[derive(Debug)]
/// struct Zeroes(u64);
///
/// impl Storage for Zeroes {
///     fn read_exact_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
///         buf.fill(0);
///         Ok(())
///     }
///     fn len(&self) -> Result<u64> {
///         Ok(self.0)
///     }
///     read_only_storage!();
/// }
///
/// let z = Zeroes(512);
/// assert!(z.is_read_only());
/// assert!(matches!(z.write_all_at(b"x", 0), Err(Error::ReadOnly)));
/// ```
#[macro_export]
macro_rules! read_only_storage {
    () => {
        fn write_all_at(&self, _buf: &[u8], _offset: u64) -> $crate::Result<()> {
            Err($crate::Error::ReadOnly)
        }
        fn set_len(&self, _len: u64) -> $crate::Result<()> {
            Err($crate::Error::ReadOnly)
        }
        fn flush(&self) -> $crate::Result<()> {
            Ok(())
        }
        fn is_read_only(&self) -> bool {
            true
        }
    };
}
