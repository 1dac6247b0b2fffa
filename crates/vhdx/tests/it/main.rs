#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Integration tests for diskimg-vhdx, cross-checked against qemu-img / qemu-io.

mod common;
mod crash;
mod diff;
mod epoch;
mod guard;
mod hostile;
mod hostile_bounded;
mod model;
mod read;
mod write;
