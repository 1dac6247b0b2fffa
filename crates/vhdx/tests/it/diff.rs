//! diff tests.
