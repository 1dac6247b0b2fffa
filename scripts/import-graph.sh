#!/usr/bin/env bash
# Prints every crate's module import graph and the crate graph, and checks the
# architecture rules of issue 16 (no import cycle of more than two files in a crate,
# the CLI on the facade, convert and blockio only, no downcast outside the format crates,
# no function over 120 lines).
# The same checks run in `cargo test --workspace` (tests/it/import_graph.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
DISKIMG_IMPORT_GRAPH=1 cargo test -q -p diskimg --test it import_graph -- --nocapture --test-threads=1
