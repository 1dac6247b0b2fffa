//! Opens arbitrary bytes as vhd, then maps, reads and checks what opened.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskimg_testutil::exercise_driver(&diskimg_vhd::DRIVER, data);
});
