//! Creating fixed, dynamic and differencing VHDs with qemu-img's layout and size rules.

use std::hash::{BuildHasher, Hasher};

use diskimg_blockio::{CreateRequest, Error, FilePurpose, Result, Storage, write_zeroes_by_buffer};

use crate::VhdCreateOptions;
use crate::footer::{DiskType, FOOTER_SIZE, Footer, rounded_size};
use crate::header::{self, HEADER_SIZE, NewLocator};
use crate::open::read_footer;

/// Block size of the dynamic disks qemu (and we) create: 2 MiB.
pub const BLOCK_SIZE: u32 = 0x20_0000;

/// A random (version 4) UUID.
pub(crate) fn new_uuid() -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        half.copy_from_slice(&h.finish().to_be_bytes());
    }
    if let Some(b) = out.get_mut(6) {
        *b = (*b & 0x0f) | 0x40;
    }
    if let Some(b) = out.get_mut(8) {
        *b = (*b & 0x3f) | 0x80;
    }
    out
}

/// Seconds since the VHD epoch (2000-01-01), as the footer's "Time Stamp".
pub(crate) fn now_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix.saturating_sub(crate::footer::VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// Creates the image `req` describes, with options `p`, on the empty `storage`.
pub(crate) fn create(
    storage: &dyn Storage,
    req: &CreateRequest,
    p: &VhdCreateOptions,
) -> Result<()> {
    let mut size = req.size;
    if p.azure_align {
        size = size
            .checked_next_multiple_of(1 << 20)
            .ok_or(Error::invalid("size overflow"))?;
    }
    if let Some(name) = p.backing_file.as_deref() {
        let parent = req.files.open(name, FilePurpose::Backing, false)?;
        return create_differencing_in(storage, parent.as_ref(), name, req.image_dir.as_deref());
    }
    // qemu silently rounds the size up to whole sectors.
    let size = size
        .checked_next_multiple_of(512)
        .ok_or(Error::invalid("size overflow"))?;
    let force_size = p.force_size || p.azure_align;
    let (geo, sectors) = rounded_size(size, force_size)?;
    let total = sectors * 512;
    let creator = if force_size { *b"qem2" } else { *b"qemu" };
    let kind = if p.fixed {
        DiskType::Fixed
    } else {
        DiskType::Dynamic
    };
    let footer = Footer::build(kind, total, geo, creator, now_timestamp(), new_uuid());
    storage.set_len(0)?;
    if p.fixed {
        storage.preallocate(0, total, p.preallocation)?;
        storage.set_len(total)?;
        storage.write_all_at(&footer.raw, total)?;
        return storage.flush();
    }
    let entries = u32::try_from(sectors.div_ceil(u64::from(BLOCK_SIZE / 512)))
        .map_err(|_| Error::invalid("Disk size is too large, max size is 2040 GiB"))?;
    write_dynamic(storage, &footer, entries, None)
}

/// The parent's footer, its file name, and the locators (code, UTF-16LE data).
type ParentInfo<'a> = (&'a Footer, &'a str, Vec<(u32, Vec<u8>)>);

/// Writes footer copy, dynamic header, an empty BAT, optional locator data, and the
/// end footer.
fn write_dynamic(
    storage: &dyn Storage,
    footer: &Footer,
    entries: u32,
    parent: Option<ParentInfo<'_>>,
) -> Result<()> {
    let bat_bytes = (u64::from(entries) * 4).next_multiple_of(512);
    let bat_at = 3 * 512u64;
    let mut next = bat_at + bat_bytes;
    let mut locs = Vec::new();
    if let Some((_, _, datas)) = &parent {
        for (code, data) in datas {
            locs.push(NewLocator {
                code: *code,
                offset: next,
                data: data.clone(),
            });
            next += (data.len() as u64).next_multiple_of(512).max(512);
        }
    }
    let hdr = match &parent {
        Some((pf, name, _)) => header::build(
            entries,
            BLOCK_SIZE,
            Some((&pf.uuid, pf.timestamp, name, &locs)),
        ),
        None => header::build(entries, BLOCK_SIZE, None),
    };
    storage.set_len(0)?;
    storage.write_all_at(&footer.raw, 0)?;
    storage.write_all_at(&hdr, FOOTER_SIZE as u64)?;
    debug_assert_eq!(FOOTER_SIZE + HEADER_SIZE, 1536);
    let ff = vec![0xffu8; usize::try_from(bat_bytes).unwrap_or(0)];
    storage.write_all_at(&ff, bat_at)?;
    for l in &locs {
        let len = (l.data.len() as u64).next_multiple_of(512).max(512);
        write_zeroes_by_buffer(storage, l.offset, len)?;
        storage.write_all_at(&l.data, l.offset)?;
    }
    storage.write_all_at(&footer.raw, next)?;
    storage.flush()
}

/// Creates a differencing VHD on `storage` whose parent is the VHD in `parent`, named
/// `name` (as the user gave it: relative to the new image's directory, or absolute).
///
/// The child copies the parent's size fields and geometry, records its unique id and
/// time stamp, and stores `name` as a W2ru (relative) or W2ku + MacX (absolute) locator;
/// [`create_differencing_in`] also derives the other form from the image's directory.
pub fn create_differencing(storage: &dyn Storage, parent: &dyn Storage, name: &str) -> Result<()> {
    create_differencing_in(storage, parent, name, None)
}

/// [`create_differencing`] for an image in the absolute directory `image_dir`: the
/// locators name the parent in every form derivable from `name` and that directory
/// (W2ku absolute, W2ru relative, MacX file URL), as Windows writes both W2ku and W2ru.
pub fn create_differencing_in(
    storage: &dyn Storage,
    parent: &dyn Storage,
    name: &str,
    image_dir: Option<&std::path::Path>,
) -> Result<()> {
    // The parent is the caller's choice: one that is not a VHD is a bad argument.
    let (pf, _) = read_footer(parent).map_err(|e| match e {
        Error::NotThisFormat { what, .. } => Error::InvalidArgument(what),
        e => e,
    })?;
    let size = pf.current_size;
    let sectors = pf.virtual_size(None) / 512;
    let entries = u32::try_from(sectors.div_ceil(u64::from(BLOCK_SIZE / 512)))
        .map_err(|_| Error::invalid("Disk size is too large, max size is 2040 GiB"))?;
    let footer = Footer::build(
        DiskType::Differencing,
        size,
        pf.geometry,
        pf.creator_app,
        now_timestamp(),
        new_uuid(),
    );
    let datas = crate::locator::locators_for(name, image_dir);
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    write_dynamic(storage, &footer, entries, Some((&pf, base, datas)))
}
