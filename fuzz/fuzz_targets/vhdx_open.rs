//! Opens arbitrary bytes as vhdx, then maps, reads and checks what opened.
//!
//! Headers and region tables carry CRC-32C checksums that a mutated input almost never
//! matches, so each input is tried twice: as given, and with the checksums of both headers
//! (4 KiB at 64 and 128 KiB) and both region tables (64 KiB at 192 and 256 KiB) recomputed,
//! which lets the fuzzer reach the parsing behind them.
#![no_main]
use libfuzzer_sys::fuzz_target;

const KIB: usize = 1024;

/// Recomputes the CRC-32C at byte 4 of the `len`-byte structure at `at` (if present and
/// carrying a non-zero signature).
fn fix(buf: &mut [u8], at: usize, len: usize) {
    let Some(b) = buf.get_mut(at..at + len) else {
        return;
    };
    if b.len() != len || b[..4] == [0; 4] {
        return;
    }
    b[4..8].fill(0);
    let c = crc32c::crc32c(b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    diskimg_testutil::exercise_driver(&diskimg_vhdx::DRIVER, data);
    let mut fixed = data.to_vec();
    fix(&mut fixed, 64 * KIB, 4 * KIB);
    fix(&mut fixed, 128 * KIB, 4 * KIB);
    fix(&mut fixed, 192 * KIB, 64 * KIB);
    fix(&mut fixed, 256 * KIB, 64 * KIB);
    if fixed != data {
        diskimg_testutil::exercise_driver(&diskimg_vhdx::DRIVER, &fixed);
    }
});
