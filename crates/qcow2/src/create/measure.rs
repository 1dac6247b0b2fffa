//! `measure`: the file size a qcow2 image of some content would need, computed as
//! qemu's `qcow2_measure` does (header, full L1/L2 tables and refcount structures of a
//! fully allocated image, plus the data clusters actually needed).

use diskimg_blockio::{Error, OptionList, Preallocation, Result};

use crate::create::options::{Compat, Keys, Qcow2CreateOptions, Verb};

/// A target qcow2 layout, from `qemu-img measure -O qcow2 -o …` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeasureTarget {
    /// `cluster_size` (default 64 KiB).
    pub cluster_size: u64,
    /// log2 of `refcount_bits` (default 4).
    pub refcount_order: u32,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// `preallocation=falloc|full`: every data cluster counts as required.
    pub preallocate_data: bool,
    /// `compat=1.1` (the default): the target can hold persistent bitmaps.
    pub v3: bool,
    /// `backing_file` given: every cluster is assumed to need copying.
    pub has_backing: bool,
}

/// The result of a measurement (qemu's `BlockMeasureInfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes needed for the image as it would be converted (or created).
    pub required: u64,
    /// Bytes needed with every cluster allocated.
    pub fully_allocated: u64,
}

impl MeasureTarget {
    /// Parses the target options with the create adapter (`size` is ignored, other
    /// unknown keys too; encryption is refused) and checks the layout rules create
    /// applies too ([`Qcow2CreateOptions::check_layout`]).
    pub fn from_options(opts: &OptionList) -> Result<Self> {
        let mut o = opts.clone();
        o.take("size");
        let keys = Keys::take(&mut o, Verb::Create)?;
        let has_backing = keys.backing_file.as_ref().is_some_and(|b| !b.is_empty());
        let c = Qcow2CreateOptions::from_keys(keys, None);
        c.check_layout()?;
        if o.take_bool("encryption")?.unwrap_or(false)
            || o.entries().iter().any(|(k, _)| k.starts_with("encrypt."))
        {
            return Err(Error::unsupported("qcow2", "measuring encrypted images"));
        }
        Ok(Self {
            cluster_size: c.cluster_size,
            refcount_order: c.refcount_bits.trailing_zeros(),
            extended_l2: c.extended_l2,
            preallocate_data: matches!(
                c.preallocation,
                Preallocation::Falloc | Preallocation::Full
            ),
            v3: c.compat == Compat::V3,
            has_backing,
        })
    }

    /// The sizes for a `virtual_size` image. `data` is the byte count of the source's
    /// clusters (in this target's cluster size) holding data, or `None` when measuring a
    /// size alone (`--size`).
    pub fn measure(&self, virtual_size: u64, data: Option<u64>) -> Result<Measurement> {
        let cs = self.cluster_size;
        let too_big = || Error::invalid("Image size too large for measurement");
        let vsize = virtual_size
            .checked_next_multiple_of(cs)
            .ok_or_else(too_big)?;
        // qemu's bound: the L1 table may take at most 32 MiB.
        let l2e = if self.extended_l2 { 16 } else { 8 };
        if (vsize / cs).div_ceil(cs / l2e) * 8 > 32 << 20 {
            return Err(Error::invalid(
                "The image size is too large (try using a larger cluster size)",
            ));
        }
        let mut required = match data {
            Some(_) if self.has_backing => vsize,
            Some(d) => d,
            None => 0,
        };
        if self.preallocate_data {
            required = vsize;
        }
        let fully =
            prealloc_size(vsize, cs, self.refcount_order, self.extended_l2).ok_or_else(too_big)?;
        let required = (fully - vsize).checked_add(required).ok_or_else(too_big)?;
        Ok(Measurement {
            required,
            fully_allocated: fully,
        })
    }
}

/// qemu's `qcow2_calc_prealloc_size`: header, L2 and L1 tables, refcount structures and
/// data of a fully allocated image of `size` bytes (a multiple of `cs`).
fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> Option<u64> {
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (size / cs).checked_next_multiple_of(cs / l2e)?;
    meta = meta.checked_add(nl2e.checked_mul(l2e)?)?;
    let nl1e = (nl2e * l2e / cs).checked_next_multiple_of(cs / 8)?;
    meta = meta.checked_add(nl1e.checked_mul(8)?)?;
    let clusters = meta.checked_add(size)? / cs;
    meta = meta.checked_add(refcount_metadata_size(clusters, cs, refcount_order)?)?;
    meta.checked_add(size)
}

/// qemu's `qcow2_refcount_metadata_size` (without the generous increase): refcount
/// blocks and table covering `clusters` clusters and themselves.
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> Option<u64> {
    let per_table_cluster = cs / 8;
    let per_block = (cs * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    for _ in 0..64 {
        let last = n;
        blocks = clusters
            .checked_add(table)?
            .checked_add(blocks)?
            .div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return blocks.checked_add(table)?.checked_mul(cs);
        }
    }
    None
}

/// Bytes persistent bitmaps of a `virtual_size` image with these `(name length,
/// granularity)` pairs take in a target of cluster size `cs` (qemu's
/// `qcow2_get_persistent_dirty_bitmap_size`).
pub fn bitmaps_size(virtual_size: u64, cs: u64, bitmaps: &[(usize, u64)]) -> u64 {
    let mut size = 0u64;
    let mut dir = 0u64;
    for &(name_len, gran) in bitmaps {
        let bytes = virtual_size.div_ceil(gran.max(1)).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        size = size.saturating_add(clusters.saturating_mul(cs));
        size = size.saturating_add(
            clusters
                .saturating_mul(8)
                .checked_next_multiple_of(cs)
                .unwrap_or(u64::MAX),
        );
        dir = dir.saturating_add((24 + name_len as u64).next_multiple_of(8));
    }
    size.saturating_add(dir.checked_next_multiple_of(cs).unwrap_or(u64::MAX))
}
