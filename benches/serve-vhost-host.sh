#!/usr/bin/env bash
# vhost-user-blk: diskimg serve vs qemu-storage-daemon measured from the host, without a
# guest: benches/vhost-client (libblkio's virtio-blk-vhost-user driver, crates.io `blkio`,
# the driver fio's libblkio engine and QEMU's virtio-blk-vhost-user blockdev use) runs
# serve-vhost.sh's rows (4 KiB random read/write at QD1 and QD16, 1 MiB sequential
# read/write at QD1 and QD16) against each server's export of its own copy of the same
# qcow2, in rounds with the first server rotating, and prints one markdown table: medians,
# the ratio to qemu-storage-daemon with the range of per-round ratios and their geometric
# mean with its 95 % confidence interval (each round pairs the servers a few seconds
# apart, so the disk's drift cancels out of its ratio), each server's CPU time per I/O
# (/proc/PID/stat over the runs) and virtio requests per I/O.
#
# The client cuts each I/O as a guest's block layer does (4 KiB data segments, at most
# the device's seg_max per request: 1 MiB is one 258-descriptor request for diskimg,
# three for qemu-storage-daemon's seg_max 126), but it has no indirect descriptors
# (libblkio puts every segment on the ring), so a 1 MiB QD16 row keeps as many I/Os in
# flight as QUEUE_SIZE descriptors hold (3 at 1024), on both servers alike.
#
# Usage: benches/serve-vhost-host.sh [SIZE (default 512M)] [SECONDS per run (default 2)]
#   ROUNDS=2        rounds per case and rotation (the table gives medians and per-round
#                   ratio ranges over all rotations)
#   ROTATE=1        every server serves every copy of the image in turn (one rotation per
#                   server: the servers restart on the next copy in between). A copy's
#                   place on the disk decides a lot on `O_DIRECT` (the same binary got 1.34x
#                   qemu-storage-daemon's 1 MiB QD1 reads on one copy and 0.90x on
#                   another: docs/benchmarks.md, "Session 11"); ROTATE=0: one rotation
#   RAW=file        also keep every round's measurement there (`vhost-client table FILE`)
#   CASES=a,b,...   only these cases, named RW-BS-QD as serve-vhost.sh's (e.g. read-1M-1)
#   DISKIMG=path    the diskimg binary (default target/release/diskimg)
#   DISKIMG_ARGS    extra arguments for `diskimg serve` (e.g. "--split-kib 256")
#   DIRECT=1        O_DIRECT on every server: `--cache none` for diskimg, cache.direct=on
#                   for qemu-storage-daemon (default: the page cache on both)
#   DISKIMG_B=path  a second diskimg binary (e.g. /work/bin/old/diskimg-s8) served from its
#                   own copy as a third column (DISKIMG_B_ARGS: its extra arguments)
#   SEG_KIB=4       bytes per data segment the client sends (4: a guest's pages)
#   QUEUE_SIZE=1024 descriptors in the client's ring (both servers' maximum is 1024)
#   SYNC=N          after copying the image, `sync` and wait N seconds before measuring (the
#                   copies' writeback otherwise shares the disk with the first `O_DIRECT`
#                   rows: docs/benchmarks.md "Session 12, end")
#   RT=1            servers and client at real-time priority (`chrt -f 10`, root): on a
#                   machine other work keeps busy they then get the CPUs they ask for,
#                   which steadies the ratios a lot (keep such runs short: they starve
#                   everything else on the host while they last)
# Needs: a release build (cargo build --release -p diskimg-cli), qemu-img, qemu-io,
# qemu-storage-daemon; the client builds here (cargo, from crates.io) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-512M}
secs=${2:-2}
bin=${DISKIMG:-target/release/diskimg}
[ -x "$bin" ] || { echo "build first: cargo build --release -p diskimg-cli" >&2; exit 1; }
bin_b=${DISKIMG_B:-}
[ -z "$bin_b" ] || [ -x "$bin_b" ] || { echo "DISKIMG_B=$bin_b is not executable" >&2; exit 1; }
for t in qemu-img qemu-io qemu-storage-daemon cargo; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release --manifest-path benches/vhost-client/Cargo.toml
client=$CARGO_TARGET_DIR/release/vhost-client

dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

# A fully allocated qcow2 (64 KiB clusters), one copy per server, made as serve-vhost.sh
# makes them (cp, so that no copy sits in the page cache in large folios).
names=(diskimg ${bin_b:+B} qsd)
n=${#names[@]}
qemu-img create -q -f qcow2 "$dir/src.qcow2" "$size"
qemu-io -f qcow2 -c "write -P 0x5a 0 $size" "$dir/src.qcow2" >/dev/null
for ((i = 0; i < n; i++)); do cp "$dir/src.qcow2" "$dir/copy$i.qcow2"; done
rm "$dir/src.qcow2"
[ -z "${SYNC:-}" ] || { sync; sleep "$SYNC"; }

rt=(); [ "${RT:-0}" = 1 ] && rt=(chrt -f 10)
direct=off; cache_args=()
if [ -n "${DIRECT:-}" ]; then direct=on; cache_args=(--cache none); fi

# Starts the servers, server i on copy (i + $1) mod n; sets targets and pids.
start() {
    local rot=$1 i=0
    targets=(); pids=()
    f() { echo "$dir/copy$(( (i + rot) % n )).qcow2"; }
    # shellcheck disable=SC2086
    "${rt[@]}" "$bin" serve --vhost-user-blk "$dir/diskimg.sock" --num-queues 2 "${cache_args[@]}" ${DISKIMG_ARGS:-} -f qcow2 "$(f)" & pids+=($!)
    targets+=(--target "diskimg=$dir/diskimg.sock,$!"); i=$((i + 1))
    if [ -n "$bin_b" ]; then
        # shellcheck disable=SC2086
        "${rt[@]}" "$bin_b" serve --vhost-user-blk "$dir/B.sock" --num-queues 2 "${cache_args[@]}" ${DISKIMG_B_ARGS:-${DISKIMG_ARGS:-}} -f qcow2 "$(f)" & pids+=($!)
        targets+=(--target "B=$dir/B.sock,$!"); i=$((i + 1))
    fi
    "${rt[@]}" qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$(f),cache.direct=$direct" \
        --blockdev driver=qcow2,node-name=q,file=f \
        --export "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path=$dir/qsd.sock,writable=on,num-queues=2" \
        & pids+=($!)
    targets+=(--target "qsd=$dir/qsd.sock,$!")
    for s in "${names[@]}"; do
        for _ in $(seq 100); do [ -S "$dir/$s.sock" ] && break; sleep 0.1; done
    done
}

# Stops the servers (each flushes and closes its image) and removes their sockets.
stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
    rm -f "$dir"/*.sock
}

all="randread-4k-1,randread-4k-16,randwrite-4k-1,randwrite-4k-16,read-1M-1,read-1M-16,write-1M-1,write-1M-16"
rounds=${ROUNDS:-2}
rotations=$n; [ "${ROTATE:-1}" = 0 ] && rotations=1
for ((rot = 0; rot < rotations; rot++)); do
    start "$rot"
    echo "rotation $rot: $(for ((i = 0; i < n; i++)); do printf '%s=copy%d ' "${names[i]}" $(( (i + rot) % n )); done)" >&2
    "${rt[@]}" "$client" bench "${targets[@]}" --cases "${CASES:-$all}" --secs "$secs" --rounds "$rounds" \
        --seg-kib "${SEG_KIB:-4}" --queue-size "${QUEUE_SIZE:-1024}" \
        --raw "$dir/raw.tsv" --first-round $((rot * rounds)) >&2 2>"$dir/client.err" \
        || { cat "$dir/client.err" >&2; exit 1; }
    stop
done
"$client" table "$dir/raw.tsv"
[ -z "${RAW:-}" ] || cp "$dir/raw.tsv" "$RAW"
echo
echo "size=$size runtime=${secs}s rounds=$((rounds * rotations)) (${rotations} rotations of the copies) seg=${SEG_KIB:-4}KiB queue=${QUEUE_SIZE:-1024} rt=${RT:-0} cache.direct=$direct binary=$bin ${DISKIMG_ARGS:-}${bin_b:+ B=$bin_b ${DISKIMG_B_ARGS:-${DISKIMG_ARGS:-}}} commit=$(git rev-parse --short HEAD) $(uptime | sed 's/.*load/load/')"
