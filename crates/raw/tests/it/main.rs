#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Integration tests for the raw driver: qemu interop, map, crash, model.

mod interop;
mod model;
