#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Integration tests for diskimg-vmdk against qemu-img / qemu-io.

mod common;
mod crash;
mod create;
mod epoch;
mod extents;
mod first_write;
mod fuzz_regressions;
mod guard;
mod hostile;
mod hostile_bounded;
mod model;
mod read;
mod stream;
mod workload;
