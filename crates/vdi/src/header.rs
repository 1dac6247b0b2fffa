//! The VDI pre-header and header (versions 1.0 and 1.1), parsed once at open.
//!
//! Layout (all fields little-endian), from VirtualBox's `VDICore.h` (`VDIPREHEADER`,
//! `VDIHEADER0`, `VDIHEADER1`) and qemu's `block/vdi.c`:
//!
//! | offset | v1.1 field | v1.0 field |
//! |---|---|---|
//! | 0 | text (64 bytes, informative) | same |
//! | 64 | signature `0xbeda107f` | same |
//! | 68 | version (`0x00010001`) | version (`0x00010000`) |
//! | 72 | header size (`0x180` qemu, `0x190` VirtualBox) | image type |
//! | 76 | image type | flags |
//! | 80 | flags | comment (256) |
//! | 84 | description (256) | … |
//! | 336 | … | geometry (cylinders, heads, sectors, sector size) |
//! | 340 | block map offset | … |
//! | 344 | data offset | … |
//! | 348 | geometry (cylinders, heads, sectors) | … |
//! | 352 | … | disk size (u64) |
//! | 360 | sector size | block size |
//! | 364 | translation (unused) | blocks in image |
//! | 368 | disk size (u64) | blocks allocated |
//! | 372 | … | UUID create, modify, linkage |
//! | 376 | block size | … |
//! | 380 | block extra | … |
//! | 384 | blocks in image | … |
//! | 388 | blocks allocated | … |
//! | 392 | UUID image, last snapshot (modification), link, parent | … |
//!
//! Version 1.0 has no offset fields: the block map follows the header at byte 420 and
//! the data follows the block map.

use diskimg_blockio::bytes::{ReadBytes, WriteBytes};
use diskimg_blockio::{Error, Result};

use crate::uuid::Uuid;

/// The format name used in errors.
pub(crate) const FORMAT: &str = "vdi";
/// Pre-header signature (`VDIPREHEADER.u32Signature`).
pub(crate) const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the one qemu reads and writes.
pub(crate) const VERSION_1_1: u32 = 0x0001_0001;
/// Version 1.0 (`VDIHEADER0`), read (and written in place) by diskimg only.
pub(crate) const VERSION_1_0: u32 = 0x0001_0000;
/// Sector size: the only one VDI supports.
pub(crate) const SECTOR: u64 = 512;
/// Block size: the only one qemu (and diskimg) supports.
pub(crate) const BLOCK_SIZE: u64 = 1 << 20;
/// Most blocks an image may have (qemu's `VDI_BLOCKS_IN_IMAGE_MAX`: the block map,
/// rounded up to a sector, must stay below 2 GiB).
pub(crate) const BLOCKS_MAX: u64 = ((1 << 31) - SECTOR) / 4;
/// Largest virtual size (qemu's `VDI_DISK_SIZE_MAX`).
pub(crate) const DISK_SIZE_MAX: u64 = BLOCKS_MAX * BLOCK_SIZE;
/// Image type: dynamically allocated.
pub(crate) const TYPE_DYNAMIC: u32 = 1;
/// Image type: fixed (static, preallocated).
pub(crate) const TYPE_STATIC: u32 = 2;
/// The informative text qemu writes (diskimg writes the same, so images look alike).
pub(crate) const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// Header size field qemu writes for version 1.1.
pub(crate) const HEADER_SIZE_V11: u32 = 0x180;
/// Bytes of the header sector diskimg writes on create.
pub(crate) const HEADER_SECTOR: usize = 512;
/// Size of the version 1.0 pre-header plus header (`sizeof(VDIPREHEADER) + sizeof(VDIHEADER0)`).
pub(crate) const V10_HEADER_END: u64 = 420;
/// End of the version 1.1 header fields qemu uses (`0x48 + 0x180`).
pub(crate) const V11_HEADER_END: u64 = 456;

/// Field offsets that differ between versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    image_type: usize,
    disk_size: usize,
    block_size: usize,
    blocks: usize,
    allocated: usize,
    uuid_image: usize,
    uuid_modify: usize,
    uuid_link: usize,
    uuid_parent: Option<usize>,
}

const V11: Layout = Layout {
    image_type: 76,
    disk_size: 368,
    block_size: 376,
    blocks: 384,
    allocated: 388,
    uuid_image: 392,
    uuid_modify: 408,
    uuid_link: 424,
    uuid_parent: Some(440),
};

const V10: Layout = Layout {
    image_type: 72,
    disk_size: 352,
    block_size: 360,
    blocks: 364,
    allocated: 368,
    uuid_image: 372,
    uuid_modify: 388,
    uuid_link: 404,
    uuid_parent: None,
};

/// The parsed header: the fields diskimg uses. The raw bytes are kept by the caller so
/// unknown fields survive rewrites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// `VDIPREHEADER.u32Version`.
    pub version: u32,
    /// Field offsets for this version.
    pub layout: Layout,
    /// `u32Type`: 1 dynamic, 2 static (fixed), 3 undo, 4 differencing.
    pub image_type: u32,
    /// `offBlocks`: byte offset of the block map.
    pub offset_bmap: u64,
    /// `offData`: byte offset of block 0's data.
    pub offset_data: u64,
    /// `cbDisk` rounded up to a sector (as qemu does for `VBoxManage convertfromraw` images).
    pub disk_size: u64,
    /// `cBlocks`: entries in the block map.
    pub blocks: u64,
    /// `cBlocksAllocated`.
    pub allocated: u64,
}

fn get32(b: &[u8], off: usize) -> Result<u32> {
    b.le_u32(off)
        .ok_or_else(|| Error::corrupt(FORMAT, "header truncated", off as u64))
}

/// The block map and data offsets (fixed in 1.0, header fields in 1.1), checked as qemu
/// does.
fn offsets(buf: &[u8], version: u32, blocks: u64) -> Result<(u64, u64)> {
    if version == VERSION_1_0 {
        return Ok((V10_HEADER_END, V10_HEADER_END + blocks * 4));
    }
    let ob = u64::from(get32(buf, 340)?);
    let od = u64::from(get32(buf, 344)?);
    if ob % SECTOR != 0 {
        return Err(Error::unsupported(
            FORMAT,
            format!("unsupported VDI image (unaligned block map offset {ob:#x})"),
        ));
    }
    if od % SECTOR != 0 {
        return Err(Error::unsupported(
            FORMAT,
            format!("unsupported VDI image (unaligned data offset {od:#x})"),
        ));
    }
    let sector_size = get32(buf, 360)?;
    if u64::from(sector_size) != SECTOR {
        return Err(Error::unsupported(
            FORMAT,
            format!("unsupported VDI image (sector size {sector_size} is not 512)"),
        ));
    }
    Ok((ob, od))
}

/// qemu's checks of the block size and count, the link and parent UUIDs and the block
/// extra data, in its order.
fn check_geometry(
    buf: &[u8],
    version: u32,
    layout: Layout,
    disk_size: u64,
    blocks: u64,
) -> Result<()> {
    let block_size = u64::from(get32(buf, layout.block_size)?);
    if block_size != BLOCK_SIZE {
        return Err(Error::unsupported(
            FORMAT,
            format!("unsupported VDI image (block size {block_size} is not {BLOCK_SIZE})"),
        ));
    }
    if disk_size > blocks * block_size {
        return Err(Error::unsupported(
            FORMAT,
            format!(
                "unsupported VDI image (disk size {disk_size}, image bitmap has room for {})",
                blocks * block_size
            ),
        ));
    }
    let uuid_at = |off: usize| -> Result<Uuid> {
        buf.array_at::<16>(off)
            .map(Uuid::from_disk)
            .ok_or_else(|| Error::corrupt(FORMAT, "header truncated", off as u64))
    };
    if !uuid_at(layout.uuid_link)?.is_nil() {
        return Err(Error::unsupported(
            FORMAT,
            "unsupported VDI image (non-NULL link UUID)",
        ));
    }
    if let Some(p) = layout.uuid_parent
        && !uuid_at(p)?.is_nil()
    {
        return Err(Error::unsupported(
            FORMAT,
            "unsupported VDI image (non-NULL parent UUID)",
        ));
    }
    if blocks > BLOCKS_MAX {
        return Err(Error::unsupported(
            FORMAT,
            format!("unsupported VDI image (too many blocks {blocks}, max is {BLOCKS_MAX})"),
        ));
    }
    if version == VERSION_1_1 {
        let extra = get32(buf, 380)?;
        if extra != 0 {
            // qemu ignores this field and would read the wrong bytes; refuse instead.
            return Err(Error::unsupported(
                FORMAT,
                format!("unsupported VDI image (block extra data {extra} is not 0)"),
            ));
        }
    }
    Ok(())
}

impl Header {
    /// Parses and validates a header, in qemu's order and with qemu's messages.
    /// `buf` holds the first 512 bytes of the file (or fewer if the file is shorter).
    pub(crate) fn parse(buf: &[u8]) -> Result<Header> {
        let signature = get32(buf, 64)?;
        let version = get32(buf, 68)?;
        let layout = if version == VERSION_1_0 { V10 } else { V11 };
        let need = if version == VERSION_1_0 {
            V10_HEADER_END
        } else {
            V11_HEADER_END
        };
        if (buf.len() as u64) < need {
            return Err(Error::corrupt(FORMAT, "header truncated", 0));
        }
        let raw_disk_size = buf
            .le_u64(layout.disk_size)
            .ok_or_else(|| Error::corrupt(FORMAT, "header truncated", 0))?;
        if raw_disk_size > DISK_SIZE_MAX {
            return Err(Error::unsupported(
                FORMAT,
                format!(
                    "Unsupported VDI image size (size is {raw_disk_size:#x}, max supported is {DISK_SIZE_MAX:#x})"
                ),
            ));
        }
        let disk_size = raw_disk_size.div_ceil(SECTOR) * SECTOR;
        if signature != SIGNATURE {
            return Err(Error::not_format(
                FORMAT,
                format!("Image not in VDI format (bad signature {signature:08x})"),
                64,
            ));
        }
        if version != VERSION_1_1 && version != VERSION_1_0 {
            return Err(Error::unsupported(
                FORMAT,
                format!(
                    "unsupported VDI image (version {}.{})",
                    version >> 16,
                    version & 0xffff
                ),
            ));
        }
        let blocks = u64::from(get32(buf, layout.blocks)?);
        let (offset_bmap, offset_data) = offsets(buf, version, blocks)?;
        check_geometry(buf, version, layout, disk_size, blocks)?;
        Ok(Header {
            version,
            layout,
            image_type: get32(buf, layout.image_type)?,
            offset_bmap,
            offset_data,
            disk_size,
            blocks,
            allocated: u64::from(get32(buf, layout.allocated)?),
        })
    }

    /// The first byte past the header fields (where metadata writes may start overlapping
    /// the block map).
    pub(crate) fn header_end(&self) -> u64 {
        if self.version == VERSION_1_0 {
            V10_HEADER_END
        } else {
            V11_HEADER_END
        }
    }

    /// True for fixed (static) images.
    pub(crate) fn is_static(&self) -> bool {
        self.image_type == TYPE_STATIC
    }

    /// Stores the fields diskimg changes (allocated count, sizes, offsets) into `buf`,
    /// which holds the raw header bytes.
    pub(crate) fn store(&self, buf: &mut [u8]) -> Result<()> {
        let l = self.layout;
        let fit32 =
            |v: u64| u32::try_from(v).map_err(|_| Error::internal("vdi header field overflow"));
        let mut ok = buf.put_le_u32(l.allocated, fit32(self.allocated)?)
            && buf.put_le_u32(l.blocks, fit32(self.blocks)?)
            && buf.put_le_u64(l.disk_size, self.disk_size);
        if self.version == VERSION_1_1 {
            ok = ok
                && buf.put_le_u32(340, fit32(self.offset_bmap)?)
                && buf.put_le_u32(344, fit32(self.offset_data)?);
        }
        if ok {
            Ok(())
        } else {
            Err(Error::internal("vdi header buffer too short"))
        }
    }

    /// Writes a new modification UUID into `buf`.
    pub(crate) fn store_modify_uuid(&self, buf: &mut [u8], uuid: Uuid) -> bool {
        buf.put(self.layout.uuid_modify, &uuid.to_disk())
    }

    /// The image (creation) UUID from `buf`.
    pub(crate) fn image_uuid(&self, buf: &[u8]) -> Option<Uuid> {
        buf.array_at::<16>(self.layout.uuid_image)
            .map(Uuid::from_disk)
    }

    /// The modification UUID from `buf`.
    pub(crate) fn modify_uuid(&self, buf: &[u8]) -> Option<Uuid> {
        buf.array_at::<16>(self.layout.uuid_modify)
            .map(Uuid::from_disk)
    }
}

/// A fresh version 1.1 header sector, as qemu's create writes it.
pub(crate) fn new_header_sector(
    image_type: u32,
    disk_size: u64,
    blocks: u64,
    offset_data: u64,
) -> Result<[u8; HEADER_SECTOR]> {
    let mut b = [0u8; HEADER_SECTOR];
    let fit32 = |v: u64| u32::try_from(v).map_err(|_| Error::internal("vdi header field overflow"));
    let allocated = if image_type == TYPE_STATIC { blocks } else { 0 };
    let ok = b.put(0, TEXT)
        && b.put_le_u32(64, SIGNATURE)
        && b.put_le_u32(68, VERSION_1_1)
        && b.put_le_u32(72, HEADER_SIZE_V11)
        && b.put_le_u32(76, image_type)
        && b.put_le_u32(340, fit32(SECTOR)?)
        && b.put_le_u32(344, fit32(offset_data)?)
        && b.put_le_u32(360, fit32(SECTOR)?)
        && b.put_le_u64(368, disk_size)
        && b.put_le_u32(376, fit32(BLOCK_SIZE)?)
        && b.put_le_u32(384, fit32(blocks)?)
        && b.put_le_u32(388, fit32(allocated)?)
        && b.put(392, &Uuid::random().to_disk())
        && b.put(408, &Uuid::random().to_disk());
    if ok {
        Ok(b)
    } else {
        Err(Error::internal("vdi header buffer too short"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_header_parses() {
        let b = new_header_sector(TYPE_DYNAMIC, 5 << 20, 5, 1024).unwrap();
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.disk_size, 5 << 20);
        assert_eq!(h.blocks, 5);
        assert_eq!(h.offset_bmap, 512);
        assert_eq!(h.offset_data, 1024);
        assert_eq!(h.allocated, 0);
        assert!(!h.is_static());
        assert_ne!(h.image_uuid(&b), h.modify_uuid(&b));
    }

    #[test]
    fn rejects_bad_fields() {
        let b = new_header_sector(TYPE_DYNAMIC, 5 << 20, 5, 1024).unwrap();
        let mut x = b;
        x[64] ^= 1;
        assert!(Header::parse(&x).is_err());
        let mut x = b;
        assert!(x.put_le_u32(376, 4096));
        assert!(Header::parse(&x).is_err());
        let mut x = b;
        assert!(x.put_le_u32(384, 4));
        assert!(Header::parse(&x).is_err());
        assert!(Header::parse(&b[..100]).is_err());
        assert!(Header::parse(&[]).is_err());
    }
}
