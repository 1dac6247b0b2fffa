//! model tests.
