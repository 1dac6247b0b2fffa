//! The diskimg command-line tool (being written).
fn main() {}
