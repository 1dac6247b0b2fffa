//! Opens arbitrary bytes as qcow2, then maps, reads and checks what opened.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskimg_testutil::exercise_driver(&diskimg_qcow2::DRIVER, data);
});
