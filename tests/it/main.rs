#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
//! Facade tests: probing, open policy, create options.

mod capability;
mod close;
mod corpus;
mod create;
mod differencing;
mod epoch;
mod formats;
mod hostile;
mod import_graph;
mod import_lex;
mod import_parse;
mod inspect;
mod inspect_rules;
mod json_errors;
mod policy;
mod probe;
mod stress;
mod taxonomy;
mod uring;
