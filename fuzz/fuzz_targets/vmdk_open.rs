//! Opens arbitrary bytes as vmdk, then maps, reads and checks what opened.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskimg_testutil::exercise_driver(&diskimg_vmdk::DRIVER, data);
});
