//! Opens arbitrary bytes as a standalone luks image (header parsing, key-slot bounds,
//! payload offset); without a key nothing past the header is decrypted.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskimg_testutil::exercise_driver(&diskimg_luks::DRIVER, data);
});
