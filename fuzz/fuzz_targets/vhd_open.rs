//! Opens arbitrary bytes as vhd, then maps, reads and checks what opened.
//!
//! The footer and dynamic header carry checksums that a mutated input almost never matches,
//! so each input is tried twice: as given, and with both checksums recomputed (which lets the
//! fuzzer reach the parsing behind them).
#![no_main]
use libfuzzer_sys::fuzz_target;

/// One's complement of the byte sum of `buf`, skipping the 4-byte field at `skip`.
fn vhd_sum(buf: &[u8], skip: usize) -> u32 {
    let s = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    !s
}

fn fix(buf: &mut [u8], at: usize, len: usize, field: usize) {
    if let Some(b) = buf.get_mut(at..at.saturating_add(len)) {
        if b.len() == len {
            let s = vhd_sum(b, field);
            b[field..field + 4].copy_from_slice(&s.to_be_bytes());
        }
    }
}

fn fix_checksums(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    let n = v.len();
    if n < 512 {
        return v;
    }
    fix(&mut v, n - 512, 512, 64);
    fix(&mut v, 0, 512, 64);
    let hdr = v
        .get(16..24)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
        .and_then(|o| usize::try_from(o).ok());
    if let Some(h) = hdr {
        fix(&mut v, h, 1024, 36);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    diskimg_testutil::exercise_driver(&diskimg_vhd::DRIVER, data);
    let fixed = fix_checksums(data);
    if fixed != data {
        diskimg_testutil::exercise_driver(&diskimg_vhd::DRIVER, &fixed);
    }
});
