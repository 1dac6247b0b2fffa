#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Integration tests for diskimg-blockio.

mod copy;
mod map_files;
