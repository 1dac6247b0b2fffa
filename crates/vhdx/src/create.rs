//! Creating images: dynamic, fixed and differencing, with qemu's options and defaults.

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{CreateOptionSpec, CreateRequest, Error, FilePurpose, Result, Storage};

use crate::VhdxCreateOptions;
use crate::bat::{Geometry, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_ZERO, make_entry};
use crate::format::{BAT_GUID, Guid, METADATA_GUID, MIB};
use crate::header::{Header, Region, Regions, file_identifier, header_offset, region_table_bytes};
use crate::metadata::{MAX_VIRTUAL_SIZE, Metadata, ParentLocator, metadata_region_bytes};
use crate::options::{block_bytes, log_bytes};

/// The create options (qemu's names, plus `backing_file`/`backing_fmt` for
/// differencing images, which qemu cannot create).
pub(crate) static CREATE_OPTIONS: &[CreateOptionSpec] = &[
    CreateOptionSpec {
        name: "size",
        kind: "<size>",
        help: "Virtual disk size; max of 64TB.",
    },
    CreateOptionSpec {
        name: "log_size",
        kind: "<size>",
        help: "Log size; min 1MB.",
    },
    CreateOptionSpec {
        name: "block_size",
        kind: "<size>",
        help: "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    },
    CreateOptionSpec {
        name: "subformat",
        kind: "<str>",
        help: "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    },
    CreateOptionSpec {
        name: "block_state_zero",
        kind: "<bool (on/off)>",
        help: "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic.",
    },
    CreateOptionSpec {
        name: "backing_file",
        kind: "<str>",
        help: "Parent image of a differencing VHDX (diskimg extension)",
    },
    CreateOptionSpec {
        name: "backing_fmt",
        kind: "<str>",
        help: "Format of the parent image (must be vhdx)",
    },
];

/// qemu's automatic block size: it scales with the disk size.
fn default_block_size(size: u64) -> u64 {
    if size > 32 << 40 {
        64 * MIB
    } else if size > 100 << 30 {
        32 * MIB
    } else if size > 1 << 30 {
        16 * MIB
    } else {
        8 * MIB
    }
}

/// Parsed create options.
#[derive(Debug)]
struct Params {
    size: u64,
    block_size: u64,
    log_size: u64,
    fixed: bool,
    block_state_zero: bool,
    parent: Option<String>,
    /// The parent's `DataWriteGuid` (MS-VHDX 2.6.2.6 `parent_linkage`), zero when the
    /// parent could not be read at create time.
    linkage: Guid,
    /// The new image's absolute directory, when known (derives the other path form).
    image_dir: Option<std::path::PathBuf>,
}

/// The size as written (whole sectors), refused above 64 TiB as qemu does.
pub(crate) fn check_size(size: u64) -> Result<u64> {
    match size.checked_next_multiple_of(512) {
        Some(s) if s <= MAX_VIRTUAL_SIZE => Ok(s),
        _ => Err(Error::invalid("Image size too large; max of 64TB")),
    }
}

/// The layout `o` asks for, for an image of `request.size` bytes.
fn resolve(request: &CreateRequest, o: &VhdxCreateOptions) -> Result<Params> {
    let size = check_size(request.size)?;
    let block_size = match o.block_size {
        None => default_block_size(size),
        Some(b) => block_bytes(b)?,
    };
    Ok(Params {
        size,
        block_size,
        log_size: log_bytes(o.log_size)?,
        fixed: o.fixed,
        block_state_zero: o.block_state_zero,
        parent: o.backing_file.clone(),
        linkage: Guid::ZERO,
        image_dir: request.image_dir.clone(),
    })
}

/// The parent locator: `parent_linkage`, then `relative_path` and `absolute_win32_path`
/// for every form derivable from `name` and the image's directory (Hyper-V writes both).
fn parent_locator(name: &str, linkage: Guid, image_dir: Option<&std::path::Path>) -> ParentLocator {
    let forms = diskimg_blockio::parent_path::ParentForms::derive(name, image_dir);
    let mut entries = vec![("parent_linkage".to_string(), linkage.to_braced_string())];
    if let Some(r) = forms.windows_relative() {
        entries.push(("relative_path".to_string(), r));
    }
    if let Some(a) = forms.windows_absolute() {
        entries.push(("absolute_win32_path".to_string(), a));
    }
    ParentLocator {
        entries,
        linkage_at: None,
    }
}

/// Writes a new image with options `o` to `storage`.
pub(crate) fn create(
    storage: &dyn Storage,
    request: &CreateRequest,
    o: &VhdxCreateOptions,
) -> Result<()> {
    let mut p = resolve(request, o)?;
    // Link to the parent's current DataWriteGuid, as Hyper-V checks, when the open policy
    // lets us read the parent now (otherwise the zero GUID, which Hyper-V refuses).
    if let Some(name) = &p.parent
        && let Ok(parent) = request.files.open(name, FilePurpose::Backing, false)
        && let Ok((h, _)) = crate::header::read_current_header(parent.as_ref())
    {
        p.linkage = h.data_write_guid;
    }
    write_image(storage, &p, 512)
}

/// Writes the image described by `p` with `logical_sector`-byte logical sectors.
fn write_image(storage: &dyn Storage, p: &Params, logical_sector: u32) -> Result<()> {
    let meta = Metadata {
        block_size: u32::try_from(p.block_size).map_err(|_| Error::invalid("block size"))?,
        leave_blocks_allocated: p.fixed,
        has_parent: p.parent.is_some(),
        virtual_size: p.size,
        virtual_size_at: 0,
        logical_sector,
        physical_sector: logical_sector,
        disk_id: Guid::random(),
        parent: p
            .parent
            .as_deref()
            .map(|n| parent_locator(n, p.linkage, p.image_dir.as_deref())),
    };
    let geo = Geometry::new(&meta)?;
    let log_offset = MIB;
    let metadata_offset = log_offset + p.log_size;
    let bat_offset = metadata_offset + MIB;
    let bat_bytes = geo.entries.saturating_mul(8);
    let bat_len = bat_bytes.next_multiple_of(MIB).max(MIB);
    let data_offset = bat_offset + bat_len;
    let too_big = || Error::invalid("image too large");
    let regions = Regions {
        bat: Region {
            guid: BAT_GUID,
            offset: bat_offset,
            length: u32::try_from(bat_len).map_err(|_| too_big())?,
            required: true,
        },
        metadata: Region {
            guid: METADATA_GUID,
            offset: metadata_offset,
            length: 1 << 20,
            required: true,
        },
    };
    let log_len = u32::try_from(p.log_size).map_err(|_| too_big())?;
    storage.set_len(0)?;
    storage.write_all_at(&file_identifier("diskimg"), 0)?;
    let h1 = Header::new(1, log_offset, log_len);
    let mut h2 = h1.clone();
    h2.sequence = 2;
    storage.write_all_at(&h1.to_bytes(), header_offset(0))?;
    storage.write_all_at(&h2.to_bytes(), header_offset(1))?;
    let rt = region_table_bytes(&regions);
    storage.write_all_at(&rt, crate::format::REGION1_OFFSET)?;
    storage.write_all_at(&rt, crate::format::REGION2_OFFSET)?;
    storage.write_all_at(&metadata_region_bytes(&meta)?, metadata_offset)?;
    // The BAT, written in 1 MiB pieces so huge sparse disks need no huge buffer.
    let mut end = data_offset;
    let payload_state = if p.block_state_zero && !meta.has_parent {
        PAYLOAD_ZERO
    } else {
        PAYLOAD_NOT_PRESENT
    };
    if p.fixed || payload_state != PAYLOAD_NOT_PRESENT {
        let per_piece = MIB / 8;
        let mut piece = vec![0u8; usize::try_from(MIB).unwrap_or(1 << 20)];
        let mut i = 0u64;
        let mut next_block = 0u64;
        while i < geo.entries {
            piece.fill(0);
            let n = per_piece.min(geo.entries - i);
            for k in 0..n {
                let idx = i + k;
                if geo.is_bitmap_index(idx) {
                    continue;
                }
                let e = if p.fixed {
                    let off = data_offset + next_block * p.block_size;
                    next_block += 1;
                    make_entry(PAYLOAD_FULLY_PRESENT, off)
                } else {
                    make_entry(payload_state, 0)
                };
                piece.put_le_u64(usize::try_from(k * 8).unwrap_or(0), e);
            }
            let bytes = usize::try_from(n * 8).unwrap_or(0);
            storage.write_all_at(piece.get(..bytes).unwrap_or(&[]), bat_offset + i * 8)?;
            i += n;
        }
        if p.fixed {
            end = data_offset + next_block * p.block_size;
        }
    }
    storage.set_len(end)?;
    storage.flush()?;
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]
mod tests {
    use super::*;
    use diskimg_blockio::{Driver, MemStorage, OpenOptions};
    use std::sync::Arc;

    /// 4096-byte logical sectors (qemu cannot create them): chunk ratio and sector
    /// bitmap granularity change; a differencing image must still read right.
    #[test]
    fn logical_4k_differencing() {
        let size = 6u64 << 20;
        let parent_s = Arc::new(MemStorage::new());
        let p = Params {
            size,
            block_size: MIB,
            log_size: MIB,
            fixed: false,
            block_state_zero: true,
            parent: None,
            linkage: Guid::ZERO,
            image_dir: None,
        };
        write_image(parent_s.as_ref(), &p, 4096).unwrap();
        let parent = crate::DRIVER.open(parent_s, &OpenOptions::new()).unwrap();
        parent.write_at(&vec![0x5a; size as usize], 0).unwrap();
        let vhdx = parent.as_any().downcast_ref::<crate::VhdxDevice>().unwrap();
        let linkage = vhdx.read_state().header.data_write_guid;
        let child_s = Arc::new(MemStorage::new());
        let c = Params {
            parent: Some("p.vhdx".into()),
            linkage,
            ..p
        };
        write_image(child_s.as_ref(), &c, 4096).unwrap();
        let child = crate::DRIVER
            .open(child_s.clone(), &OpenOptions::new())
            .unwrap();
        child.set_backing(Some(parent.clone())).unwrap();
        let mut model = vec![0x5au8; size as usize];
        for (i, (off, len)) in [
            (10u64, 100usize),
            (4095, 2),
            (MIB + 8192, 4096),
            (5 * MIB - 1, 1),
        ]
        .iter()
        .enumerate()
        {
            let data = vec![i as u8 + 1; *len];
            child.write_at(&data, *off).unwrap();
            model[*off as usize..*off as usize + len].copy_from_slice(&data);
        }
        drop(child);
        let child = crate::DRIVER.open(child_s, &OpenOptions::new()).unwrap();
        child.set_backing(Some(parent)).unwrap();
        let mut got = vec![0u8; size as usize];
        child.read_at(&mut got, 0).unwrap();
        assert!(got == model);
        let e = child.map(0, size).unwrap();
        assert_eq!(e.len, 8192);
        let dev = child.as_any().downcast_ref::<crate::VhdxDevice>().unwrap();
        assert_eq!(dev.sector_sizes(), (4096, 4096));
        assert_eq!(dev.subformat(), "differencing");
    }

    #[derive(Debug)]
    struct OneFile(Arc<MemStorage>);

    impl diskimg_blockio::HostFiles for OneFile {
        fn open(
            &self,
            name: &str,
            purpose: FilePurpose,
            _writable: bool,
        ) -> Result<Arc<dyn Storage>> {
            assert_eq!((name, purpose), ("base.vhdx", FilePurpose::Backing));
            Ok(self.0.clone())
        }
        fn create(&self, _name: &str, _purpose: FilePurpose) -> Result<Arc<dyn Storage>> {
            Err(Error::invalid("no"))
        }
    }

    #[test]
    fn differencing_images_link_to_the_parents_data_write_guid() {
        let parent_s = Arc::new(MemStorage::new());
        let req = CreateRequest::new(4 << 20, diskimg_blockio::OptionList::new());
        create(parent_s.as_ref(), &req, &VhdxCreateOptions::new()).unwrap();
        let (ph, _) = crate::header::read_current_header(parent_s.as_ref()).unwrap();
        let child_s = MemStorage::new();
        let opts = VhdxCreateOptions::new().backing_file("base.vhdx");
        let req = CreateRequest::new(4 << 20, diskimg_blockio::OptionList::new())
            .files(Arc::new(OneFile(parent_s)));
        create(&child_s, &req, &opts).unwrap();
        let want: Vec<u8> = ph
            .data_write_guid
            .to_braced_string()
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let bytes = child_s.to_vec();
        assert!(ph.data_write_guid != Guid::ZERO);
        assert!(
            bytes.windows(want.len()).any(|w| w == want),
            "linkage GUID not recorded"
        );
    }
}
