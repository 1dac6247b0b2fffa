//! write tests.
