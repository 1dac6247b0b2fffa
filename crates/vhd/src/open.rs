//! Opening a VHD: footer (at 0 or at the end), dynamic header, BAT, parent reference,
//! with qemu's validation order and messages.

use std::sync::{Arc, Mutex, RwLock};

use diskimg_blockio::bytes::ReadBytes;
use diskimg_blockio::{BackingRef, Error, MetaRanges, OpenOptions, Result, Storage};

use crate::device::{Alloc, Dynamic, VhdDevice};
use crate::footer::FORMAT;
use crate::footer::{DiskType, FOOTER_SIZE, Footer, MAX_SECTORS, SizeCalc};
use crate::header::{
    BLOCK_SIZE_AT, DynHeader, HEADER_SIZE, MAX_ENTRIES_AT, UNALLOCATED, locator_areas,
};

/// Reads and validates the footer: the copy at offset 0, else the one at the end
/// (which must then describe a fixed disk), as qemu does.
pub(crate) fn read_footer(storage: &dyn Storage) -> Result<(Footer, u64)> {
    let len = storage.len()?;
    if len < FOOTER_SIZE as u64 {
        return Err(Error::not_format(
            FORMAT,
            "File too small for a VHD header",
            0,
        ));
    }
    let mut buf = [0u8; FOOTER_SIZE];
    storage.read_exact_at(&mut buf, 0)?;
    if buf.get(..8) == Some(crate::footer::COOKIE.as_slice()) {
        return Ok((Footer::parse(&buf, 0)?, 0));
    }
    let at = len - FOOTER_SIZE as u64;
    storage.read_exact_at(&mut buf, at)?;
    if buf.get(..8) != Some(crate::footer::COOKIE.as_slice()) || buf.be_u32(60) != Some(2) {
        return Err(Error::not_format(FORMAT, "invalid VPC image", at));
    }
    Ok((Footer::parse(&buf, at)?, at))
}

/// How sure we are that `storage` is a VHD (see [`crate::VhdDriver`]'s probe).
pub(crate) fn probe(storage: &dyn Storage) -> u32 {
    let mut buf = [0u8; FOOTER_SIZE];
    if storage.read_exact_at(&mut buf[..8], 0).is_ok()
        && buf.get(..8) == Some(crate::footer::COOKIE.as_slice())
    {
        return 100;
    }
    let Ok(len) = storage.len() else { return 0 };
    let Some(at) = len.checked_sub(FOOTER_SIZE as u64) else {
        return 0;
    };
    if storage.read_exact_at(&mut buf, at).is_ok()
        && Footer::looks_valid(&buf)
        && buf.be_u32(60) == Some(2)
    {
        return 60;
    }
    0
}

/// Opens `storage` as a VHD device.
pub(crate) fn open(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<VhdDevice> {
    let force = match options.driver_options.get("force_size_calc") {
        None => None,
        Some("chs") => Some(SizeCalc::Chs),
        Some("current_size") => Some(SizeCalc::CurrentSize),
        Some(v) => {
            return Err(Error::invalid(format!(
                "Invalid value '{v}' for parameter 'force_size_calc' (expected chs or current_size)"
            )));
        }
    };
    let (footer, footer_at) = read_footer(storage.as_ref())?;
    let size = footer.virtual_size(force);
    if size / 512 > MAX_SECTORS {
        return Err(Error::unsupported(FORMAT, "disk size larger than 2040 GiB"));
    }
    let file_len = storage.len()?;
    let read_only = options.read_only || storage.is_read_only();
    let mut dev = VhdDevice {
        storage,
        read_only,
        closed: diskimg_blockio::Closed::new(),
        size,
        footer,
        dynamic: None,
        backing: RwLock::new(None),
        backing_epoch: diskimg_blockio::BackingEpoch::default(),
        backing_ref: None,
    };
    match dev.footer.disk_type {
        DiskType::Fixed => {
            if footer_at != 0 && size > footer_at {
                return Err(Error::corrupt(
                    FORMAT,
                    "fixed disk data area is smaller than the virtual size",
                    footer_at,
                ));
            }
            if footer_at == 0 && size > 0 {
                return Err(Error::unsupported(
                    FORMAT,
                    "fixed disk with a footer at offset 0",
                ));
            }
        }
        DiskType::Dynamic | DiskType::Differencing => {
            let diff = dev.footer.disk_type == DiskType::Differencing;
            let hdr_at = dev.footer.data_offset;
            let mut hbuf = [0u8; HEADER_SIZE];
            if hdr_at >= file_len {
                // The footer's data offset field (byte 16) points past the end.
                return Err(Error::corrupt(
                    FORMAT,
                    "Error reading dynamic VHD header",
                    footer_at + 16,
                ));
            }
            // As qemu, bytes past the end of the file read as zeroes.
            let avail = usize::try_from((file_len - hdr_at).min(HEADER_SIZE as u64)).unwrap_or(0);
            let part = hbuf
                .get_mut(..avail)
                .ok_or(Error::internal("dynamic VHD header buffer"))?;
            dev.storage.read_exact_at(part, hdr_at)?;
            let h = DynHeader::parse(&hbuf, hdr_at, dev.storage.as_ref(), &options.limits, diff)?;
            let mut d = load_dynamic(&dev, h, &hbuf, hdr_at, file_len, options)?;
            d.raw_header = hbuf.to_vec();
            if diff {
                let (rel, abs) = d.header.parent_paths();
                let mut r = BackingRef::new("", Some(FORMAT.to_string()));
                match (rel, abs) {
                    (Some(rel), abs) => {
                        r.filename = rel;
                        r.alternates.extend(abs);
                    }
                    (None, Some(abs)) => r.filename = abs,
                    (None, None) => r.filename = d.header.parent_name.clone(),
                }
                if let Some(mac) = d.header.mac_path()
                    && mac != r.filename
                    && !r.alternates.contains(&mac)
                {
                    if r.filename.is_empty() {
                        r.filename = mac;
                    } else {
                        r.alternates.push(mac);
                    }
                }
                // Last resort: the parent's file name beside the child (a chain copied
                // from Windows keeps relative placement but not drive paths).
                let base = d.header.parent_name.replace('\\', "/");
                let base = base.rsplit('/').next().unwrap_or_default().to_string();
                if !base.is_empty() && base != r.filename && !r.alternates.contains(&base) {
                    r.alternates.push(base);
                }
                dev.backing_ref = Some(r);
            }
            dev.dynamic = Some(d);
        }
    }
    Ok(dev)
}

fn load_dynamic(
    dev: &VhdDevice,
    h: DynHeader,
    raw_header: &[u8],
    hdr_at: u64,
    file_len: u64,
    options: &OpenOptions,
) -> Result<Dynamic> {
    let bs = h.block_size;
    if !bs.is_power_of_two() || bs < 512 {
        return Err(Error::corrupt(
            FORMAT,
            format!("Invalid block size {bs}"),
            hdr_at + BLOCK_SIZE_AT,
        ));
    }
    let bs = u64::from(bs);
    let bitmap_size = (bs / (8 * 512)).next_multiple_of(512);
    if dev.size / bs > 0xffff_ffff {
        return Err(Error::corrupt(
            FORMAT,
            "Too many blocks",
            hdr_at + BLOCK_SIZE_AT,
        ));
    }
    let entries = u64::from(h.max_table_entries);
    if entries.saturating_mul(bs) < dev.size {
        return Err(Error::corrupt(
            FORMAT,
            "Page table too small",
            hdr_at + MAX_ENTRIES_AT,
        ));
    }
    if entries > u64::from(i32::MAX.unsigned_abs() / 4) {
        return Err(Error::corrupt(
            FORMAT,
            format!("Max Table Entries too large ({})", h.max_table_entries),
            hdr_at + MAX_ENTRIES_AT,
        ));
    }
    let bat_bytes = entries * 4;
    let bat_off = h.table_offset;
    if bat_off.checked_add(bat_bytes).is_none_or(|e| e > file_len) {
        return Err(Error::corrupt(
            FORMAT,
            "BAT beyond the end of the file",
            hdr_at + 16,
        ));
    }
    let mut raw = options.limits.alloc("vpc BAT", bat_bytes)?;
    dev.storage.read_exact_at(&mut raw, bat_off)?;
    let mut bat: Vec<u32> = options.limits.alloc_elems("vpc BAT", entries, 4)?;
    let mut free = (bat_off + bat_bytes).next_multiple_of(512);
    for (i, e) in bat.iter_mut().enumerate() {
        *e = raw.be_u32(i * 4).unwrap_or(UNALLOCATED);
        if *e != UNALLOCATED {
            let next = u64::from(*e) * 512 + bitmap_size + bs;
            free = free.max(next);
        }
    }
    if free > file_len {
        return Err(Error::corrupt(
            FORMAT,
            "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.",
            bat_off,
        ));
    }
    let diff = dev.footer.disk_type == DiskType::Differencing;
    let (meta, reserved_end) = metadata(raw_header, hdr_at, bat_off, bat_bytes, diff)?;
    // `check` opens (qemu's BDRV_O_CHECK) leave overlapping blocks for it to report.
    if options.driver_options.get("check") != Some("on") {
        check_blocks(
            dev.storage.as_ref(),
            &bat,
            &meta,
            bitmap_size + bs,
            file_len,
        )?;
    }
    Ok(Dynamic {
        header: h,
        raw_header: Vec::new(),
        block_size: bs,
        bitmap_size,
        bat_offset: bat_off,
        bat: RwLock::new(bat),
        // New blocks go after the blocks, the BAT and everything the header points at
        // (parent locators `create` places right after the BAT, with their reserved room).
        alloc: Mutex::new(Alloc {
            free: free.max(reserved_end),
            pending: None,
        }),
        meta,
    })
}

/// Where the metadata of a dynamic disk lies: the footer copy, the dynamic header, the
/// BAT (whole sectors) and, for a differencing disk, the data of every parent locator;
/// and the end of everything they reserve. Refuses layouts whose structures overlap.
fn metadata(
    raw_header: &[u8],
    hdr_at: u64,
    bat_off: u64,
    bat_bytes: u64,
    diff: bool,
) -> Result<(MetaRanges, u64)> {
    let mut v = vec![
        (0, FOOTER_SIZE as u64, "footer copy"),
        (hdr_at, HEADER_SIZE as u64, "dynamic disk header"),
        (bat_off, bat_bytes.next_multiple_of(512), "BAT"),
    ];
    let mut reserved_end = 0u64;
    if diff {
        for l in locator_areas(raw_header) {
            v.push((l.offset, l.data, "parent locator"));
            reserved_end = reserved_end.max(l.offset.saturating_add(l.reserved));
        }
    }
    let meta = MetaRanges::build(v).map_err(|o| o.to_error(FORMAT))?;
    let end = meta.end().max(reserved_end).next_multiple_of(512);
    Ok((meta, end))
}

/// Refuses allocated blocks (bitmap and data, `unit` bytes) that overlap metadata or a
/// valid footer at the end of the file: writes there would destroy it.
fn check_blocks(
    storage: &dyn Storage,
    bat: &[u32],
    meta: &MetaRanges,
    unit: u64,
    file_len: u64,
) -> Result<()> {
    let tail = file_len.saturating_sub(FOOTER_SIZE as u64);
    let mut buf = [0u8; FOOTER_SIZE];
    let end_footer =
        storage.read_exact_at(&mut buf, tail).is_ok() && Footer::looks_valid(&buf) && tail > 0;
    for &e in bat.iter().filter(|&&e| e != UNALLOCATED) {
        let start = u64::from(e) * 512;
        let over_footer = end_footer && start < file_len && tail < start.saturating_add(unit);
        if meta.overlapping(start, unit).is_some() || over_footer {
            return Err(Error::corrupt(
                FORMAT,
                "BAT entry points at image metadata",
                start,
            ));
        }
    }
    Ok(())
}
