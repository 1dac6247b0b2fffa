//! What a conversion is asked to do ([`ConvertOptions`]) and what it did
//! ([`ConvertStats`]): the plain types every stage of the copy shares.

use std::sync::Arc;

use diskimg_blockio::BlockDevice;

/// Default chunk size: the unit of work for one thread and of progress reports.
pub const DEFAULT_CHUNK: u64 = 2 << 20;

/// Default zero-detection granularity (qemu-img's `-S` default).
pub const DEFAULT_SPARSE: u64 = 4096;

/// How [`convert`](crate::convert) copies.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Zero blocks of this many bytes inside data are not written (`-S`); 0 fully
    /// allocates the target and writes zero ranges as data.
    pub sparse_size: u64,
    /// The target already reads as zeroes everywhere (freshly created, or
    /// `--target-is-zero`): zero ranges need no write at all.
    pub target_is_zero: bool,
    /// Write whole units compressed (`-c`). A target whose
    /// [`needs_compressed_writes`](BlockDevice::needs_compressed_writes) is true is
    /// written compressed in any case.
    pub compress: bool,
    /// The target's backing image (`-B`): ranges equal to it are not written.
    pub backing: Option<Arc<dyn BlockDevice>>,
    /// Bytes per chunk (rounded up to the compression unit when compressing).
    pub chunk_size: u64,
    /// Reader threads (`-m`); 1 copies on the calling thread. The default is the number
    /// of CPUs (at most 16).
    pub workers: usize,
    /// Let workers write as soon as they are done (`-W`) instead of in order.
    pub out_of_order: bool,
    /// Copy offloading (`-C`): data of the source's top layer that has a host offset in
    /// its [`data_storage`](BlockDevice::data_storage) is handed to the target's
    /// [`write_from`](BlockDevice::write_from) (`copy_file_range` between files) instead
    /// of being read, and is not scanned for zeroes. Data from backing layers, sources
    /// without a data storage and targets without one (which could not offload: other
    /// formats, encrypted qcow2) are copied as usual, as qemu-img falls back to reads and
    /// writes. Not with [`Self::compress`].
    pub copy_offload: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            sparse_size: DEFAULT_SPARSE,
            target_is_zero: false,
            compress: false,
            backing: None,
            chunk_size: DEFAULT_CHUNK,
            workers: std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(16),
            out_of_order: false,
            copy_offload: false,
        }
    }
}

/// What [`convert`](crate::convert) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Bytes of the source (its virtual size).
    pub total_bytes: u64,
    /// Bytes written as plain data.
    pub data_bytes: u64,
    /// Bytes written compressed (before compression).
    pub compressed_bytes: u64,
    /// Bytes written with `write_from` (copy offloading).
    pub offloaded_bytes: u64,
    /// Bytes made zero with `write_zeroes`.
    pub zeroed_bytes: u64,
    /// Bytes not written at all (zero on a zero target, or equal to the backing).
    pub skipped_bytes: u64,
}

impl ConvertStats {
    pub(crate) fn add(&mut self, o: &ConvertStats) {
        self.data_bytes += o.data_bytes;
        self.compressed_bytes += o.compressed_bytes;
        self.offloaded_bytes += o.offloaded_bytes;
        self.zeroed_bytes += o.zeroed_bytes;
        self.skipped_bytes += o.skipped_bytes;
    }
}
