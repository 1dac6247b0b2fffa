#!/bin/sh
# Runs fuzz targets one after another (one libFuzzer process at a time, at nice 19), each
# for its own number of seconds, and prints one line per target: seconds, executions,
# coverage and features at the end, and whether it stopped on a finding.
# Usage (from the repository root, after fuzz/make_seeds.sh):
#   fuzz/run_all.sh                              # every target, the default budgets
#   RUNS="qcow2_rw:600 nbd_stream:300" fuzz/run_all.sh
# Needs cargo-fuzz and a nightly toolchain (`cargo +nightly`; or RUSTC_BOOTSTRAP=1 with
# TOOLCHAIN=stable). Logs go to $LOGS (default fuzz/logs, git-ignored), findings to
# fuzz/artifacts/<target>/.
set -u
cd "$(dirname "$0")/.."
TOOLCHAIN=${TOOLCHAIN:-nightly}
LOGS=${LOGS:-fuzz/logs}
RUNS=${RUNS:-"qcow2_rw:600 nbd_stream:480 json_backing:360 write_ops:600 qcow2_open:360 probe:240
vmdk_open:300 vmdk_descriptor:240 vdi_open:240 vhd_open:240 vhdx_open:300 luks_open:240"}
mkdir -p "$LOGS"
for run in $RUNS; do
    t=${run%%:*}
    secs=${run#*:}
    mkdir -p "fuzz/corpus/$t"
    case $t in vhd_open | vhdx_open | probe) extra=-max_len=4194304 ;; *) extra= ;; esac
    nice -n 19 cargo "+$TOOLCHAIN" fuzz run -O -a -s none "$t" -- -max_total_time="$secs" \
        -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 $extra >"$LOGS/$t.log" 2>&1
    rc=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$LOGS/$t.log" | grep -o '[0-9]*$')
    cov=$(grep -E '^#[0-9]+' "$LOGS/$t.log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+')
    finding=$(grep -oE '(deadly signal|ERROR: libFuzzer: [a-z-]+|panicked at [^ ]+)' "$LOGS/$t.log" | head -1)
    echo "$(date -u +%H:%M) $t ${secs}s runs=${runs:-?} ${cov:-} rc=$rc ${finding:-no finding}"
done
