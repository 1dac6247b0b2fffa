//! Opening: a `KDMV`/`COWD` sparse file with its embedded descriptor, or a text
//! descriptor naming extent files (opened only through [`HostFiles`]).
//!
//! [`HostFiles`]: diskimg_blockio::HostFiles

use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, RwLock};

use diskimg_blockio::{Error, FilePurpose, OpenOptions, Result, Storage};

use crate::descriptor::{Descriptor, ExtentType, MAX_DESCRIPTOR, looks_like_descriptor};
use crate::device::{DescLocation, Ext, ExtentData, VmdkDevice};
use crate::header::{COWD_MAGIC, SECTOR, SPARSE_MAGIC};
use crate::sparse::SparseExtent;

/// createType values accepted in a separate descriptor (qemu's list, plus the
/// single-file types, which qemu refuses there but which are harmless).
const CREATE_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "monolithicSparse",
    "streamOptimized",
];

fn read_text(storage: &dyn Storage, offset: u64, max: u64) -> Result<String> {
    let len = storage.len()?;
    let n = len.saturating_sub(offset).min(max).min(MAX_DESCRIPTOR);
    let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
    storage.read_exact_at(&mut buf, offset)?;
    if let Some(z) = buf.iter().position(|&b| b == 0) {
        buf.truncate(z);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The CID of the image on `storage` (for `backing_file` at create time).
pub(crate) fn read_cid(storage: &dyn Storage) -> Result<u32> {
    let mut magic = [0u8; 512];
    let len = storage.len()?;
    let n = usize::try_from(len.min(512)).unwrap_or(0);
    storage.read_exact_at(magic.get_mut(..n).unwrap_or(&mut []), 0)?;
    let text = if magic.get(0..4) == Some(SPARSE_MAGIC.as_slice()) {
        let h = crate::header::SparseHeader::parse(&magic)?;
        read_text(
            storage,
            h.desc_offset.saturating_mul(SECTOR),
            h.desc_size.saturating_mul(SECTOR),
        )?
    } else {
        read_text(storage, 0, MAX_DESCRIPTOR)?
    };
    Ok(Descriptor::parse(&text, false)?.cid)
}

/// Opens a VMDK on `storage`.
pub(crate) fn open(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<VmdkDevice> {
    let read_only = options.read_only || storage.is_read_only();
    let len = storage.len()?;
    let mut head = [0u8; 1024];
    let n = usize::try_from(len.min(1024)).unwrap_or(0);
    storage.read_exact_at(head.get_mut(..n).unwrap_or(&mut []), 0)?;
    let head = head.get(..n).unwrap_or(&[]);
    if head.get(0..4) == Some(SPARSE_MAGIC.as_slice())
        || head.get(0..4) == Some(COWD_MAGIC.as_slice())
    {
        return open_monolithic(storage, options, read_only);
    }
    if !looks_like_descriptor(head) {
        return Err(Error::not_format(
            "vmdk",
            "not a VMDK image (no magic, no descriptor)",
            0,
        ));
    }
    if len < 4 {
        return Err(Error::not_format(
            "vmdk",
            "File too small, not a valid image",
            0,
        ));
    }
    let text = read_text(storage.as_ref(), 0, MAX_DESCRIPTOR)?;
    let desc = Descriptor::parse(&text, true)?;
    if !CREATE_TYPES.contains(&desc.create_type.as_str()) {
        return Err(Error::unsupported(
            "vmdk",
            format!("Unsupported image type '{}'", desc.create_type),
        ));
    }
    if desc.extents.len() > usize::try_from(options.limits.max_extents).unwrap_or(usize::MAX) {
        return Err(Error::LimitExceeded {
            what: "vmdk extents",
            requested: desc.extents.len() as u64,
            limit: u64::from(options.limits.max_extents),
        });
    }
    if desc.extents.is_empty() {
        return Err(Error::corrupt_unplaced(
            "vmdk",
            "vmdk descriptor names no extents",
        ));
    }
    let mut extents = Vec::new();
    let mut start = 0u64;
    let mut sparse_files = std::collections::HashSet::new();
    for line in &desc.extents {
        let ro = read_only || line.access != "RW";
        let (data, sectors) = match line.kind {
            ExtentType::Zero => (ExtentData::Zero, line.sectors),
            ExtentType::Flat | ExtentType::Vmfs => {
                let s = options.files.open(&line.file, FilePurpose::Extent, !ro)?;
                let offset = line.offset.checked_mul(SECTOR).ok_or_else(|| {
                    Error::corrupt_unplaced("vmdk", "flat extent offset too large")
                })?;
                (ExtentData::Flat { storage: s, offset }, line.sectors)
            }
            ExtentType::Sparse | ExtentType::VmfsSparse => {
                let s = options.files.open(&line.file, FilePurpose::Extent, !ro)?;
                first_use(&mut sparse_files, &s)?;
                let sp = SparseExtent::open(s, !ro, &options.limits)?;
                let sectors = sp.sectors;
                (ExtentData::Sparse(Box::new(sp)), sectors)
            }
            ExtentType::SeSparse => {
                let s = options.files.open(&line.file, FilePurpose::Extent, !ro)?;
                first_use(&mut sparse_files, &s)?;
                let sp = SparseExtent::open_sesparse(s, !ro, &options.limits)?;
                let sectors = sp.sectors;
                (ExtentData::Sparse(Box::new(sp)), sectors)
            }
        };
        let bytes = sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::corrupt_unplaced("vmdk", "vmdk extent too large"))?;
        let type_name = match line.kind {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
        };
        if bytes > 0 {
            extents.push(Ext {
                start,
                len: bytes,
                file: line.file.clone(),
                type_name: type_name.to_string(),
                read_only: ro,
                data,
            });
        }
        start = start
            .checked_add(bytes)
            .ok_or_else(|| Error::corrupt_unplaced("vmdk", "vmdk disk too large"))?;
    }
    check_aliases(&extents, &storage)?;
    finish(
        desc,
        extents,
        start,
        Some(DescLocation {
            storage,
            offset: 0,
            room: None,
            text,
        }),
        read_only,
    )
}

/// Refuses a sparse extent file already opened for an earlier line, before its tables
/// are read: a descriptor naming one file thousands of times would otherwise hold its
/// grain directory once per line until [`check_aliases`] refused the image.
fn first_use(seen: &mut std::collections::HashSet<(u64, u64)>, s: &Arc<dyn Storage>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(m) = s.host_file().and_then(|f| f.metadata().ok()) else {
        return Ok(());
    };
    if seen.insert((m.dev(), m.ino())) {
        Ok(())
    } else {
        Err(Error::corrupt(
            "vmdk",
            "one sparse extent file named twice",
            0,
        ))
    }
}

/// True when `a` and `b` are the same host file (the same storage, or files with the
/// same device and inode).
fn same_file(a: &Arc<dyn Storage>, b: &Arc<dyn Storage>) -> bool {
    if std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)) {
        return true;
    }
    use std::os::unix::fs::MetadataExt;
    match (
        a.host_file().and_then(|f| f.metadata().ok()),
        b.host_file().and_then(|f| f.metadata().ok()),
    ) {
        (Some(x), Some(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Refuses extents that alias metadata: a flat extent in the descriptor file (its data
/// would overwrite the text, and a CID update would truncate the data) or over a sparse
/// extent's header and tables, and a sparse file named twice (each copy would allocate
/// grains the other does not know about).
fn check_aliases(extents: &[Ext], desc: &Arc<dyn Storage>) -> Result<()> {
    for (i, e) in extents.iter().enumerate() {
        let others = extents.iter().skip(i + 1);
        match &e.data {
            ExtentData::Flat { storage, offset } => {
                let over_sparse = extents.iter().any(|o| match &o.data {
                    ExtentData::Sparse(s) => {
                        same_file(storage, &s.storage)
                            && s.metadata().overlapping(*offset, e.len).is_some()
                    }
                    _ => false,
                });
                if same_file(storage, desc) || over_sparse {
                    return Err(Error::corrupt(
                        "vmdk",
                        "flat extent overlaps metadata in the same file",
                        *offset,
                    ));
                }
            }
            ExtentData::Sparse(s) => {
                let twice = others.into_iter().any(|o| {
                    matches!(&o.data, ExtentData::Sparse(t) if same_file(&s.storage, &t.storage))
                });
                if twice {
                    return Err(Error::corrupt(
                        "vmdk",
                        "one sparse extent file named twice",
                        0,
                    ));
                }
            }
            ExtentData::Zero => {}
        }
    }
    Ok(())
}

fn open_monolithic(
    storage: Arc<dyn Storage>,
    options: &OpenOptions,
    read_only: bool,
) -> Result<VmdkDevice> {
    let sp = SparseExtent::open(storage.clone(), !read_only, &options.limits)?;
    let (desc, loc) = match &sp.header {
        Some(h) if h.desc_offset > 0 && h.desc_size > 0 => {
            let offset = h
                .desc_offset
                .checked_mul(SECTOR)
                .ok_or_else(|| Error::corrupt("vmdk", "descriptor offset too large", 28))?;
            let room = h.desc_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR);
            let text = read_text(storage.as_ref(), offset, room)?;
            let desc = Descriptor::parse(&text, false).unwrap_or_else(|_| Descriptor {
                create_type: "monolithicSparse".to_string(),
                cid: 0xffff_ffff,
                parent_cid: 0xffff_ffff,
                ..Descriptor::default()
            });
            (
                desc,
                Some(DescLocation {
                    storage: storage.clone(),
                    offset,
                    room: Some(room),
                    text,
                }),
            )
        }
        Some(_) => (
            Descriptor {
                create_type: "monolithicSparse".to_string(),
                cid: 0xffff_ffff,
                parent_cid: 0xffff_ffff,
                ..Descriptor::default()
            },
            None,
        ),
        None => (
            Descriptor {
                create_type: "vmfsSparse".to_string(),
                cid: 0xffff_ffff,
                parent_cid: 0xffff_ffff,
                ..Descriptor::default()
            },
            None,
        ),
    };
    let size = sp
        .sectors
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::corrupt("vmdk", "vmdk capacity too large", 12))?;
    let file = desc
        .extents
        .first()
        .map(|e| e.file.clone())
        .or_else(|| {
            loc.as_ref().and_then(|l| {
                Descriptor::parse(&l.text, true)
                    .ok()
                    .and_then(|d| d.extents.first().map(|e| e.file.clone()))
            })
        })
        .unwrap_or_default();
    let ext = Ext {
        start: 0,
        len: size,
        file,
        type_name: String::new(),
        read_only,
        data: ExtentData::Sparse(Box::new(sp)),
    };
    let extents = if size > 0 { vec![ext] } else { Vec::new() };
    finish(desc, extents, size, loc, read_only)
}

fn finish(
    desc: Descriptor,
    extents: Vec<Ext>,
    size: u64,
    desc_loc: Option<DescLocation>,
    read_only: bool,
) -> Result<VmdkDevice> {
    Ok(VmdkDevice {
        cid: AtomicU32::new(desc.cid),
        extents,
        size,
        desc,
        desc_loc,
        read_only,
        closed: diskimg_blockio::Closed::new(),
        backing: RwLock::new(None),
        backing_epoch: diskimg_blockio::BackingEpoch::default(),
        cid_updated: AtomicBool::new(false),
    })
}
