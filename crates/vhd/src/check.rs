//! A basic metadata check (qemu has none for vpc): BAT entries inside the file, not
//! overlapping metadata (footer copy, header, BAT, parent locators) or each other; space past the last block reported as leaked
//! (left by an allocation cut short by a crash) and trimmed by `-r leaks`/`-r all`.

use diskimg_blockio::{CheckReport, RepairMode, Result};

use crate::device::VhdDevice;
use crate::footer::FOOTER_BYTES;
use crate::header::UNALLOCATED;

/// Checks `dev`, repairing leaks when `repair` allows it.
pub(crate) fn check(dev: &VhdDevice, repair: RepairMode) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let file_len = dev.storage.len()?;
    let Some(d) = &dev.dynamic else {
        r.image_end_offset = Some(file_len);
        return Ok(r);
    };
    if !dev.read_only {
        // The check reads the BAT from memory: make it the one on disk.
        dev.commit_bat()?;
    }
    let alloc = d.alloc.lock().unwrap_or_else(|e| e.into_inner());
    let bat = d.bat.read().unwrap_or_else(|e| e.into_inner()).clone();
    let unit = d.bitmap_size + d.block_size;
    let mut blocks: Vec<(u64, usize)> = Vec::new();
    let mut prev: Option<u64> = None;
    let mut fragmented = 0u64;
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let start = u64::from(e) * 512;
        let end = start + unit;
        if end > file_len {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR block {i} at {start:#x} extends past the end of the file"
            ));
            continue;
        }
        if let Some(m) = d.meta.overlapping(start, unit) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR block {i} at {start:#x} overlaps image metadata ({})",
                m.name
            ));
            continue;
        }
        if prev.is_some_and(|p| p + unit != start) {
            fragmented += 1;
        }
        prev = Some(start);
        blocks.push((start, i));
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if let [(a, ia), (b, ib)] = w
            && a + unit > *b
        {
            r.corruptions += 1;
            r.messages
                .push(format!("ERROR blocks {ia} and {ib} overlap at {b:#x}"));
        }
    }
    let used_end = alloc.free;
    let mut end_footer = [0u8; 512];
    let footer_ok = file_len >= FOOTER_BYTES
        && dev
            .storage
            .read_exact_at(&mut end_footer, file_len - FOOTER_BYTES)
            .is_ok()
        && crate::footer::Footer::looks_valid(&end_footer);
    if !footer_ok {
        r.corruptions += 1;
        r.messages
            .push("ERROR the file does not end with a valid footer".to_string());
    }
    if !crate::header::checksum_ok(&d.raw_header) {
        r.corruptions += 1;
        r.messages
            .push("ERROR dynamic disk header checksum mismatch".to_string());
    }
    let tail = file_len
        .saturating_sub(FOOTER_BYTES)
        .saturating_sub(used_end);
    // Less than a block of slack is padding (Virtual PC leaves some), not a leak.
    r.leaks = tail / unit;
    if r.leaks > 0 {
        r.messages.push(format!(
            "Leaked space: {tail} bytes after the last block at {used_end:#x}"
        ));
    }
    // Trimming the tail and rewriting the end footer fixes leaks and a missing footer;
    // other corruptions are only reported.
    let fixable = r.corruptions == u64::from(!footer_ok);
    let wanted = match repair {
        RepairMode::None => false,
        RepairMode::Leaks => r.leaks > 0 && r.corruptions == 0,
        RepairMode::All => r.leaks > 0 || !footer_ok,
    };
    if wanted && fixable && !dev.read_only {
        dev.storage.write_all_at(&dev.footer.raw, used_end)?;
        dev.storage.set_len(used_end + FOOTER_BYTES)?;
        dev.storage.flush()?;
        r.leaks_fixed = r.leaks;
        r.leaks = 0;
        if !footer_ok {
            r.corruptions_fixed = 1;
            r.corruptions -= 1;
        }
    }
    r.allocated_clusters = Some(blocks.len() as u64);
    r.total_clusters = Some(bat.len() as u64);
    r.fragmented_clusters = Some(fragmented);
    r.image_end_offset = Some(used_end + FOOTER_BYTES);
    Ok(r)
}
