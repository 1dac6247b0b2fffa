#!/usr/bin/env bash
# The engine benchmark (issue 17): diskimg vs imago 0.2.6 vs `qemu-img bench` on the same
# qcow2 images, one table, with io_uring queue-depth-16 rows (the library's async face on
# O_DIRECT, beside qemu-img bench -d 16 -t none). See benches/engine/engine.rs for the patterns and knobs
# (BENCH_SIZE_MIB, BENCH_ALLOC_MIB, BENCH_READS, BENCH_CACHED_READS, BENCH_ROUNDS, BENCH_ONLY, BENCH_EXTRA,
# BENCH_ENGINES, BENCH_DIR). The read image (512 MiB at the default size) stays in BENCH_DIR;
# delete it afterwards. The allocating rows need BENCH_ALLOC_MIB (2 GiB) free while they run.
#
# BENCH_RT=1 runs the measurements (not the build) at real-time priority (`chrt -f 10`,
# root): on a machine other work keeps busy, the threads of the benchmark (and the
# qemu-img it starts) then get the CPUs they ask for, so two-thread rows can scale.
#
# Usage: benches/engine.sh
# The package lives outside the workspace (imago is built only here); it shares the
# workspace's target directory so diskimg's dependencies are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export BENCH_DIR=${BENCH_DIR:-$PWD/target/engine-bench}
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) load$(uptime | sed 's/.*load average//')"
cargo bench -q --manifest-path benches/engine/Cargo.toml --bench engine --no-run
rt=()
if [ "${BENCH_RT:-0}" = 1 ]; then rt=(chrt -f 10); fi
"${rt[@]}" cargo bench -q --manifest-path benches/engine/Cargo.toml --bench engine
