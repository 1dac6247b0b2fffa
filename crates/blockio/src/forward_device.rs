//! [`forward_device!`](crate::forward_device): the methods of a
//! [`BlockDevice`](crate::BlockDevice) wrapper that only pass the call on to the device
//! it wraps, [`forward_storage!`](crate::forward_storage)'s twin.
//!
//! Two uses. A test or debug device that watches or changes one or two requests (a
//! device that panics at one offset, one that records whether a write is unflushed)
//! writes those and names the queries it passes on: `forward_device!(inner: info, map,
//! flush)`; the methods it does not name keep the trait's defaults, which route through
//! the wrapper's own methods (the default `write_vectored_at` writes each buffer with
//! the wrapper's `write_at`), so a request method added to the trait later still goes
//! through the wrapper. A filter that hands every request and query it does not handle
//! itself to the device below says `forward_device!(inner: all except …)`, naming what it
//! writes itself or leaves to the defaults: every other method is forwarded, one added to
//! the trait later included (it is added to the macro's list with the trait), so a new
//! method cannot silently fall back to a default in such a wrapper.

/// Implements [`BlockDevice`](crate::BlockDevice) methods of a wrapper by calling the same
/// method, with the same arguments, on the device it wraps. Use it inside an
/// `impl BlockDevice for …` block, beside the methods the wrapper writes itself.
///
/// The wrapped device is a field, named (`inner`) or numbered (`0`), or what a method of
/// the wrapper returns (`inner()`); any value whose methods include the trait's (a device,
/// an `Arc<dyn BlockDevice>`, a reference; the call is a method call, so an inherent
/// method of the same name on the wrapped type would take precedence).
///
/// - `forward_device!(inner: info, map, …)` forwards the named methods only; the others
///   keep the trait's defaults.
/// - `forward_device!(inner: all except read_at, write_at, …)` forwards every method but
///   the named ones, which the wrapper writes itself or leaves to the defaults. They are
///   named in the trait's order (a name out of order or not a method is a compile
///   error); `forward_device!(inner: all)` forwards everything.
///
/// The methods, in the trait's order: `info`, `virtual_size`, `read_at`, `write_at`,
/// `read_vectored_at`, `walk_runs`, `host_epoch`, `write_vectored_at`, `write_zeroes`, `discard`,
/// `flush`, `close`, `map`, `host_files`, `map_file`, `compressed_write_granularity`,
/// `write_compressed`, `compress_units`, `write_compressed_units`, `fixed_layout`,
/// `needs_compressed_writes`, `set_backing`, `backing_device`, `resize`, `check`,
/// `data_storage`, `write_from`, `repaired_at_open`, `as_snapshots`, `as_bitmaps`,
/// `as_amend`, `as_chain_link`, `as_any`.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// use diskimg_blockio::{BlockDevice, Result, forward_device};
///
/// /// Counts the writes that reach a device.
/// #[derive(Debug)]
/// struct Counting {
///     inner: Arc<dyn BlockDevice>,
///     writes: AtomicUsize,
/// }
///
/// impl BlockDevice for Counting {
///     forward_device!(inner: info, read_at, discard, flush, map);
///     fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
///         self.writes.fetch_add(1, Ordering::Relaxed);
///         self.inner.write_at(buf, offset)
///     }
///     fn as_any(&self) -> &dyn std::any::Any {
///         self
///     }
/// }
///
/// /// Hands everything to the device below, except that it refuses to discard.
/// #[derive(Debug)]
/// struct NoDiscard(Counting);
///
/// impl BlockDevice for NoDiscard {
///     forward_device!(0: all except discard);
///     fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
///         Err(diskimg_blockio::Error::unsupported("raw", "discards"))
///     }
/// }
///
/// # fn device() -> Arc<dyn BlockDevice> {
/// #     use diskimg_blockio::{DeviceInfo, Extent, ExtentKind, MemStorage, Storage};
/// #     #[derive(Debug)]
/// #     struct Flat(MemStorage);
/// #     impl BlockDevice for Flat {
/// #         fn info(&self) -> DeviceInfo { DeviceInfo::new("raw", 4096) }
/// #         fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
/// #             self.0.read_exact_at(buf, off)
/// #         }
/// #         fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
/// #             self.0.write_all_at(buf, off)
/// #         }
/// #         fn flush(&self) -> Result<()> { self.0.flush() }
/// #         fn map(&self, off: u64, len: u64) -> Result<Extent> {
/// #             Ok(Extent { offset: off, len, kind: ExtentKind::Data { offset: Some(off) } })
/// #         }
/// #         fn as_any(&self) -> &dyn std::any::Any { self }
/// #     }
/// #     Arc::new(Flat(MemStorage::from_vec(vec![0; 4096])))
/// # }
/// let dev = NoDiscard(Counting { inner: device(), writes: AtomicUsize::new(0) });
/// // The default write_zeroes writes zero buffers through Counting's write_at.
/// dev.write_zeroes(0, 1024, Default::default())?;
/// dev.write_at(b"boot", 0)?;
/// assert_eq!(dev.0.writes.load(Ordering::Relaxed), 2);
/// assert!(dev.discard(0, 512).is_err());
/// // Forwarded: as_any is Counting's, so a downcast finds it.
/// assert!(dev.as_any().downcast_ref::<Counting>().is_some());
/// # Ok::<(), diskimg_blockio::Error>(())
/// ```
///
/// Names out of the trait's order do not compile (the macro could not tell them from a
/// misspelt method):
///
/// ```compile_fail
/// # use std::sync::Arc;
/// # use diskimg_blockio::{BlockDevice, Result, forward_device};
/// #[derive(Debug)]
/// struct ReadOnly(Arc<dyn BlockDevice>);
///
/// impl BlockDevice for ReadOnly {
///     forward_device!(0: all except write_at, read_at);
///     fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
///         self.0.read_at(buf, offset)
///     }
///     fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
///         Err(diskimg_blockio::Error::ReadOnly)
///     }
/// }
/// ```
#[macro_export]
macro_rules! forward_device {
    ($f:tt: all $(except $($x:ident),+ $(,)?)?) => {
        $crate::forward_device!(@all [$f] [$($($x)+)?]);
    };
    ($f:tt (): all $(except $($x:ident),+ $(,)?)?) => {
        $crate::forward_device!(@all [$f()] [$($($x)+)?]);
    };
    ($f:tt: $($m:ident),+ $(,)?) => {
        $($crate::forward_device!(@one [$f] $m);)+
    };
    ($f:tt (): $($m:ident),+ $(,)?) => {
        $($crate::forward_device!(@one [$f()] $m);)+
    };
    // Every method of the trait, in its order.
    (@all $r:tt $x:tt) => {
        $crate::forward_device!(@walk $r $x
            info virtual_size read_at write_at read_vectored_at walk_runs host_epoch
            write_vectored_at write_zeroes discard flush close map host_files map_file
            compressed_write_granularity write_compressed compress_units
            write_compressed_units fixed_layout needs_compressed_writes set_backing
            backing_device resize check data_storage write_from repaired_at_open
            as_snapshots as_bitmaps as_amend as_chain_link as_any);
    };
    (@walk $r:tt []) => {};
    (@walk $r:tt [$($x:ident)+]) => {
        compile_error!(concat!(
            "forward_device!: not a BlockDevice method, or not in the trait's order: ",
            $(stringify!($x), " ",)+
        ));
    };
    (@walk $r:tt [$x:ident $($xs:ident)*] $m:ident $($ms:ident)*) => {
        $crate::forward_device!(@skip $r [$x $($xs)*] $m [$($ms)*]);
    };
    (@walk $r:tt [] $m:ident $($ms:ident)*) => {
        $crate::forward_device!(@one $r $m);
        $crate::forward_device!(@walk $r [] $($ms)*);
    };
    // `$m` is the next method, `$x` the next one not to forward: skip `$m` if they are
    // the same (one rule per method: macro_rules compares no two names), else forward it.
    (@skip $r:tt [info $($xs:ident)*] info [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [virtual_size $($xs:ident)*] virtual_size [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [read_at $($xs:ident)*] read_at [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [write_at $($xs:ident)*] write_at [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [read_vectored_at $($xs:ident)*] read_vectored_at [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [walk_runs $($xs:ident)*] walk_runs [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [host_epoch $($xs:ident)*] host_epoch [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [write_vectored_at $($xs:ident)*] write_vectored_at [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [write_zeroes $($xs:ident)*] write_zeroes [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [discard $($xs:ident)*] discard [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [flush $($xs:ident)*] flush [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [close $($xs:ident)*] close [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [map $($xs:ident)*] map [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [host_files $($xs:ident)*] host_files [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [map_file $($xs:ident)*] map_file [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [compressed_write_granularity $($xs:ident)*] compressed_write_granularity [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [write_compressed $($xs:ident)*] write_compressed [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [compress_units $($xs:ident)*] compress_units [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [write_compressed_units $($xs:ident)*] write_compressed_units [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [fixed_layout $($xs:ident)*] fixed_layout [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [needs_compressed_writes $($xs:ident)*] needs_compressed_writes [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [set_backing $($xs:ident)*] set_backing [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [backing_device $($xs:ident)*] backing_device [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [resize $($xs:ident)*] resize [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [check $($xs:ident)*] check [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [data_storage $($xs:ident)*] data_storage [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [write_from $($xs:ident)*] write_from [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [repaired_at_open $($xs:ident)*] repaired_at_open [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [as_snapshots $($xs:ident)*] as_snapshots [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [as_bitmaps $($xs:ident)*] as_bitmaps [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [as_amend $($xs:ident)*] as_amend [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [as_chain_link $($xs:ident)*] as_chain_link [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [as_any $($xs:ident)*] as_any [$($ms:ident)*]) => { $crate::forward_device!(@walk $r [$($xs)*] $($ms)*); };
    (@skip $r:tt [$($xs:ident)*] $m:ident [$($ms:ident)*]) => {
        $crate::forward_device!(@one $r $m);
        $crate::forward_device!(@walk $r [$($xs)*] $($ms)*);
    };
    (@one [$($r:tt)+] info) => {
        fn info(&self) -> $crate::DeviceInfo {
            $crate::forward_device!(@call self [$($r)+] info())
        }
    };
    (@one [$($r:tt)+] virtual_size) => {
        fn virtual_size(&self) -> u64 {
            $crate::forward_device!(@call self [$($r)+] virtual_size())
        }
    };
    (@one [$($r:tt)+] read_at) => {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] read_at(buf, offset))
        }
    };
    (@one [$($r:tt)+] write_at) => {
        fn write_at(&self, buf: &[u8], offset: u64) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] write_at(buf, offset))
        }
    };
    (@one [$($r:tt)+] read_vectored_at) => {
        fn read_vectored_at(
            &self,
            bufs: &mut [::std::io::IoSliceMut<'_>],
            offset: u64,
        ) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] read_vectored_at(bufs, offset))
        }
    };
    (@one [$($r:tt)+] walk_runs) => {
        fn walk_runs(
            &self,
            offset: u64,
            len: u64,
            f: &mut $crate::RunFn<'_>,
        ) -> $crate::Result<bool> {
            $crate::forward_device!(@call self [$($r)+] walk_runs(offset, len, f))
        }
    };
    (@one [$($r:tt)+] host_epoch) => {
        fn host_epoch(&self) -> ::std::option::Option<u64> {
            $crate::forward_device!(@call self [$($r)+] host_epoch())
        }
    };
    (@one [$($r:tt)+] write_vectored_at) => {
        fn write_vectored_at(
            &self,
            bufs: &[::std::io::IoSlice<'_>],
            offset: u64,
        ) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] write_vectored_at(bufs, offset))
        }
    };
    (@one [$($r:tt)+] write_zeroes) => {
        fn write_zeroes(&self, offset: u64, len: u64, flags: $crate::ZeroFlags) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] write_zeroes(offset, len, flags))
        }
    };
    (@one [$($r:tt)+] discard) => {
        fn discard(&self, offset: u64, len: u64) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] discard(offset, len))
        }
    };
    (@one [$($r:tt)+] flush) => {
        fn flush(&self) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] flush())
        }
    };
    (@one [$($r:tt)+] close) => {
        fn close(&self) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] close())
        }
    };
    (@one [$($r:tt)+] map) => {
        fn map(&self, offset: u64, len: u64) -> $crate::Result<$crate::Extent> {
            $crate::forward_device!(@call self [$($r)+] map(offset, len))
        }
    };
    (@one [$($r:tt)+] host_files) => {
        fn host_files(&self) -> ::std::vec::Vec<::std::string::String> {
            $crate::forward_device!(@call self [$($r)+] host_files())
        }
    };
    (@one [$($r:tt)+] map_file) => {
        fn map_file(&self, offset: u64) -> usize {
            $crate::forward_device!(@call self [$($r)+] map_file(offset))
        }
    };
    (@one [$($r:tt)+] compressed_write_granularity) => {
        fn compressed_write_granularity(&self) -> ::std::option::Option<u64> {
            $crate::forward_device!(@call self [$($r)+] compressed_write_granularity())
        }
    };
    (@one [$($r:tt)+] write_compressed) => {
        fn write_compressed(&self, buf: &[u8], offset: u64) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] write_compressed(buf, offset))
        }
    };
    (@one [$($r:tt)+] compress_units) => {
        fn compress_units(&self, buf: &[u8], offset: u64) -> $crate::Result<$crate::CompressedUnits> {
            $crate::forward_device!(@call self [$($r)+] compress_units(buf, offset))
        }
    };
    (@one [$($r:tt)+] write_compressed_units) => {
        fn write_compressed_units(&self, units: $crate::CompressedUnits) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] write_compressed_units(units))
        }
    };
    (@one [$($r:tt)+] fixed_layout) => {
        fn fixed_layout(&self) -> bool {
            $crate::forward_device!(@call self [$($r)+] fixed_layout())
        }
    };
    (@one [$($r:tt)+] needs_compressed_writes) => {
        fn needs_compressed_writes(&self) -> bool {
            $crate::forward_device!(@call self [$($r)+] needs_compressed_writes())
        }
    };
    (@one [$($r:tt)+] set_backing) => {
        fn set_backing(
            &self,
            backing: ::std::option::Option<::std::sync::Arc<dyn $crate::BlockDevice>>,
        ) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] set_backing(backing))
        }
    };
    (@one [$($r:tt)+] backing_device) => {
        fn backing_device(&self) -> ::std::option::Option<::std::sync::Arc<dyn $crate::BlockDevice>> {
            $crate::forward_device!(@call self [$($r)+] backing_device())
        }
    };
    (@one [$($r:tt)+] resize) => {
        fn resize(
            &self,
            new_size: u64,
            prealloc: $crate::Preallocation,
            shrink: bool,
        ) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] resize(new_size, prealloc, shrink))
        }
    };
    (@one [$($r:tt)+] check) => {
        fn check(&self, repair: $crate::RepairMode) -> $crate::Result<$crate::CheckReport> {
            $crate::forward_device!(@call self [$($r)+] check(repair))
        }
    };
    (@one [$($r:tt)+] data_storage) => {
        fn data_storage(&self) -> ::std::option::Option<::std::sync::Arc<dyn $crate::Storage>> {
            $crate::forward_device!(@call self [$($r)+] data_storage())
        }
    };
    (@one [$($r:tt)+] write_from) => {
        fn write_from(
            &self,
            offset: u64,
            len: u64,
            src: &dyn $crate::Storage,
            src_offset: u64,
        ) -> $crate::Result<()> {
            $crate::forward_device!(@call self [$($r)+] write_from(offset, len, src, src_offset))
        }
    };
    (@one [$($r:tt)+] repaired_at_open) => {
        fn repaired_at_open(&self) -> ::std::vec::Vec<::std::string::String> {
            $crate::forward_device!(@call self [$($r)+] repaired_at_open())
        }
    };
    (@one [$($r:tt)+] as_snapshots) => {
        fn as_snapshots(&self) -> ::std::option::Option<&dyn $crate::Snapshots> {
            $crate::forward_device!(@call self [$($r)+] as_snapshots())
        }
    };
    (@one [$($r:tt)+] as_bitmaps) => {
        fn as_bitmaps(&self) -> ::std::option::Option<&dyn $crate::Bitmaps> {
            $crate::forward_device!(@call self [$($r)+] as_bitmaps())
        }
    };
    (@one [$($r:tt)+] as_amend) => {
        fn as_amend(&self) -> ::std::option::Option<&dyn $crate::Amend> {
            $crate::forward_device!(@call self [$($r)+] as_amend())
        }
    };
    (@one [$($r:tt)+] as_chain_link) => {
        fn as_chain_link(&self) -> ::std::option::Option<&dyn $crate::ChainLink> {
            $crate::forward_device!(@call self [$($r)+] as_chain_link())
        }
    };
    (@one [$($r:tt)+] as_any) => {
        fn as_any(&self) -> &dyn ::std::any::Any {
            $crate::forward_device!(@call self [$($r)+] as_any())
        }
    };
    (@one $r:tt $m:ident) => {
        compile_error!(concat!("forward_device!: not a BlockDevice method: ", stringify!($m)));
    };
    (@call $s:tt [$($r:tt)+] $m:ident($($a:ident),*)) => {{
        #[allow(unused_imports)]
        use $crate::BlockDevice as _;
        $s.$($r)+.$m($($a),*)
    }};
}
