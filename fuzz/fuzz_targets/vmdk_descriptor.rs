//! Feeds arbitrary text to the VMDK descriptor parser, then opens it as an image
//! (extent files are denied, so only the descriptor logic runs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = diskimg_vmdk::parse_descriptor(&text);
    diskimg_testutil::exercise_driver(&diskimg_vmdk::DRIVER, data);
});
