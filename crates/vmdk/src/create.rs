//! Creating images in qemu's five subformats (qemu `vmdk_co_do_create` and
//! `vmdk_init_extent` layouts: header, descriptor at sector 1, redundant grain directory
//! and tables, grain directory and tables, grains from the next grain boundary).

use std::sync::Arc;

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{CreateOptionSpec, CreateRequest, Error, FilePurpose, Result, Storage};

use crate::descriptor::NewDescriptor;
use crate::descriptor::random_u32;
use crate::header::{
    COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN,
    SECTOR, SparseHeader,
};
use crate::options::{Subformat, VmdkCreateOptions};

/// The create options, as `qemu-img create -f vmdk -o help` lists them.
pub(crate) static CREATE_OPTIONS: &[CreateOptionSpec] = &[
    CreateOptionSpec {
        name: "adapter_type",
        kind: "<str>",
        help: "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    },
    CreateOptionSpec {
        name: "backing_file",
        kind: "<str>",
        help: "File name of a base image",
    },
    CreateOptionSpec {
        name: "backing_fmt",
        kind: "<str>",
        help: "Must be 'vmdk' if present",
    },
    CreateOptionSpec {
        name: "compat6",
        kind: "<bool (on/off)>",
        help: "VMDK version 6 image",
    },
    CreateOptionSpec {
        name: "hwversion",
        kind: "<str>",
        help: "VMDK hardware version",
    },
    CreateOptionSpec {
        name: "size",
        kind: "<size>",
        help: "Virtual disk size",
    },
    CreateOptionSpec {
        name: "subformat",
        kind: "<str>",
        help: "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    },
    CreateOptionSpec {
        name: "toolsversion",
        kind: "<str>",
        help: "VMware guest tools version",
    },
    CreateOptionSpec {
        name: "zeroed_grain",
        kind: "<bool (on/off)>",
        help: "Enable efficient zero writes using the zeroed-grain GTE feature",
    },
];

/// Size of each file of the twoGbMaxExtent subformats.
const SPLIT_SIZE: u64 = 2 << 30;
/// Sectors reserved for an embedded descriptor.
const DESC_SECTORS: u64 = 20;

/// Writes one sparse extent file of `sectors` (header, tables; descriptor if given).
fn init_sparse(
    storage: &dyn Storage,
    sectors: u64,
    compress: bool,
    zeroed_grain: bool,
    desc: Option<&str>,
) -> Result<()> {
    let granularity = 128u64;
    let gtes = 512u64;
    let grains = sectors.div_ceil(granularity);
    let gt_size = (gtes * 4).div_ceil(SECTOR);
    let gt_count = grains.div_ceil(gtes);
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let rgd_offset = 1 + DESC_SECTORS;
    let tables = gd_sectors + gt_size * gt_count;
    let gd_offset = rgd_offset + tables;
    let grain_offset = (gd_offset + tables).div_ceil(granularity) * granularity;
    if grain_offset > u64::from(u32::MAX) {
        return Err(Error::invalid("vmdk image too large for a sparse extent"));
    }
    let mut flags = FLAG_RGD | FLAG_NL_DETECT;
    if compress {
        flags |= FLAG_COMPRESS | FLAG_MARKER;
    }
    if zeroed_grain {
        flags |= FLAG_ZERO_GRAIN;
    }
    let h = SparseHeader {
        version: if compress {
            3
        } else if zeroed_grain {
            2
        } else {
            1
        },
        flags,
        capacity: sectors,
        granularity,
        desc_offset: 1,
        desc_size: DESC_SECTORS,
        num_gtes_per_gt: u32::try_from(gtes).unwrap_or(512),
        rgd_offset,
        gd_offset,
        grain_offset,
        unclean_shutdown: 0,
        compress_algorithm: if compress { COMPRESSION_DEFLATE } else { 0 },
    };
    storage.set_len(0)?;
    storage.write_all_at(&h.to_bytes(), 0)?;
    storage.set_len(grain_offset * SECTOR)?;
    for base in [rgd_offset, gd_offset] {
        let mut gd = vec![0u8; usize::try_from(gd_sectors * SECTOR).unwrap_or(0)];
        let mut t = base + gd_sectors;
        for i in 0..gt_count {
            gd.put_le_u32(
                usize::try_from(i * 4).unwrap_or(usize::MAX),
                u32::try_from(t).unwrap_or(0),
            );
            t += gt_size;
        }
        storage.write_all_at(&gd, base * SECTOR)?;
    }
    if let Some(d) = desc {
        if d.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(Error::invalid(
                "vmdk descriptor too long for the embedded area",
            ));
        }
        storage.write_all_at(d.as_bytes(), SECTOR)?;
    }
    Ok(())
}

/// Creates the image described by `req` and `o` on `storage` (the descriptor or the
/// single file).
pub(crate) fn create(
    storage: Arc<dyn Storage>,
    req: &CreateRequest,
    o: &VmdkCreateOptions,
) -> Result<()> {
    let hw = o.hardware_version()?;
    let (zeroed_grain, prealloc) = (o.zeroed_grain, o.preallocation);
    let backing = o.backing_file.as_deref();
    let subformat = o.subformat.name();
    let parent_cid = match backing {
        Some(b) => {
            let s = req.files.open(b, FilePurpose::Backing, false)?;
            crate::open::read_cid(s.as_ref())?
        }
        None => 0xffff_ffff,
    };
    let size = req.size.div_ceil(SECTOR) * SECTOR;
    let sectors = size / SECTOR;
    let name = req
        .image_name
        .clone()
        .unwrap_or_else(|| "image.vmdk".to_string());
    let base = name.rsplit('/').next().unwrap_or(&name).to_string();
    let (prefix, postfix) = match base.rfind('.') {
        Some(i) => (base.get(..i).unwrap_or(""), base.get(i..).unwrap_or("")),
        None => (base.as_str(), ""),
    };
    let flat = o.subformat.is_flat();
    let split = o.subformat.is_split();
    let compress = o.subformat == Subformat::StreamOptimized;
    let mut lines = String::new();
    let mut files: Vec<(String, u64)> = Vec::new();
    if split {
        let mut left = size;
        let mut i = 1;
        while left > 0 {
            let n = left.min(SPLIT_SIZE);
            let f = format!("{prefix}-{}{i:03}{postfix}", if flat { 'f' } else { 's' });
            files.push((f, n));
            left -= n;
            i += 1;
        }
    } else if flat && size > 0 {
        files.push((format!("{prefix}-flat{postfix}"), size));
    }
    for (f, n) in &files {
        if flat {
            lines.push_str(&format!("RW {} FLAT \"{f}\" 0\n", n / SECTOR));
        } else {
            lines.push_str(&format!("RW {} SPARSE \"{f}\"\n", n / SECTOR));
        }
    }
    let single = !flat && !split;
    if single {
        lines.push_str(&format!("RW {sectors} SPARSE \"{base}\"\n"));
    }
    let desc = NewDescriptor {
        cid: random_u32(),
        parent_cid,
        create_type: subformat,
        parent_hint: backing,
        extent_lines: &lines,
        hw_version: &hw,
        size,
        adapter_type: o.adapter_type.name(),
        tools_version: &o.toolsversion,
    }
    .render();
    if single {
        init_sparse(
            storage.as_ref(),
            sectors,
            compress,
            zeroed_grain,
            Some(&desc),
        )?;
        return storage.flush();
    }
    for (f, n) in &files {
        let s = req.files.create(f, FilePurpose::Extent)?;
        if flat {
            s.set_len(0)?;
            s.preallocate(0, *n, prealloc)?;
            s.set_len(*n)?;
        } else {
            init_sparse(s.as_ref(), n / SECTOR, false, zeroed_grain, None)?;
        }
        s.flush()?;
    }
    storage.set_len(0)?;
    storage.write_all_at(desc.as_bytes(), 0)?;
    storage.flush()
}
