//! Probes arbitrary bytes and opens them as whatever the probe says.
#![no_main]
use std::sync::Arc;

use diskimg_blockio::{MemStorage, Storage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(data.to_vec()));
    let fmt = diskimg::probe(storage.as_ref());
    if let Ok(driver) = fmt.driver() {
        diskimg_testutil::exercise_driver(driver, data);
    }
});
