#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Integration tests of diskimg-convert on in-memory raw devices.

mod behind;
mod huge;
mod model;
mod modes;
mod offload;
