#!/usr/bin/env bash
# vhost-user-blk: diskimg serve vs qemu-storage-daemon measured from the host, without a
# guest: benches/vhost-client (libblkio's virtio-blk-vhost-user driver, crates.io `blkio`,
# the driver fio's libblkio engine and QEMU's virtio-blk-vhost-user blockdev use) runs
# serve-vhost.sh's rows (4 KiB random read/write at QD1 and QD16, 1 MiB sequential
# read/write at QD1 and QD16) against each server's export of its own copy of the same
# qcow2, in rounds with the first server rotating, and prints one markdown table: medians,
# the ratio to qemu-storage-daemon with the range of per-round ratios, each server's CPU
# time per I/O (/proc/PID/stat over the runs) and virtio requests per I/O.
#
# The client cuts each I/O as a guest's block layer does (4 KiB data segments, at most
# the device's seg_max per request: 1 MiB is one 258-descriptor request for diskimg,
# three for qemu-storage-daemon's seg_max 126), but it has no indirect descriptors
# (libblkio puts every segment on the ring), so a 1 MiB QD16 row keeps as many I/Os in
# flight as QUEUE_SIZE descriptors hold (3 at 1024), on both servers alike.
#
# Usage: benches/serve-vhost-host.sh [SIZE (default 512M)] [SECONDS per run (default 2)]
#   ROUNDS=5        rounds per case (the table gives medians and per-round ratio ranges)
#   CASES=a,b,...   only these cases, named RW-BS-QD as serve-vhost.sh's (e.g. read-1M-1)
#   DISKIMG=path    the diskimg binary (default target/release/diskimg)
#   DISKIMG_ARGS    extra arguments for `diskimg serve` (e.g. "--split-kib 256")
#   DIRECT=1        O_DIRECT on every server: `--cache none` for diskimg, cache.direct=on
#                   for qemu-storage-daemon (default: the page cache on both)
#   DISKIMG_B=path  a second diskimg binary (e.g. /work/bin/old/diskimg-s8) served from its
#                   own copy as a third column (DISKIMG_B_ARGS: its extra arguments)
#   SEG_KIB=4       bytes per data segment the client sends (4: a guest's pages)
#   QUEUE_SIZE=1024 descriptors in the client's ring (both servers' maximum is 1024)
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
qemu-img create -q -f qcow2 "$dir/src.qcow2" "$size"
qemu-io -f qcow2 -c "write -P 0x5a 0 $size" "$dir/src.qcow2" >/dev/null
cp "$dir/src.qcow2" "$dir/ours.qcow2"
cp "$dir/src.qcow2" "$dir/theirs.qcow2"
[ -n "$bin_b" ] && cp "$dir/src.qcow2" "$dir/b.qcow2"
rm "$dir/src.qcow2"

rt=(); [ "${RT:-0}" = 1 ] && rt=(chrt -f 10)
direct=off; cache_args=()
if [ -n "${DIRECT:-}" ]; then direct=on; cache_args=(--cache none); fi
# shellcheck disable=SC2086
"${rt[@]}" "$bin" serve --vhost-user-blk "$dir/ours.sock" --num-queues 2 "${cache_args[@]}" ${DISKIMG_ARGS:-} -f qcow2 "$dir/ours.qcow2" & pids+=($!)
targets=(--target "diskimg=$dir/ours.sock,$!")
if [ -n "$bin_b" ]; then
    # shellcheck disable=SC2086
    "${rt[@]}" "$bin_b" serve --vhost-user-blk "$dir/b.sock" --num-queues 2 "${cache_args[@]}" ${DISKIMG_B_ARGS:-${DISKIMG_ARGS:-}} -f qcow2 "$dir/b.qcow2" & pids+=($!)
    targets+=(--target "B=$dir/b.sock,$!")
fi
"${rt[@]}" qemu-storage-daemon \
    --blockdev "driver=file,node-name=f,filename=$dir/theirs.qcow2,cache.direct=$direct" \
    --blockdev driver=qcow2,node-name=q,file=f \
    --export "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path=$dir/theirs.sock,writable=on,num-queues=2" \
    & pids+=($!)
targets+=(--target "qsd=$dir/theirs.sock,$!")
for s in ours theirs ${bin_b:+b}; do
    for _ in $(seq 100); do [ -S "$dir/$s.sock" ] && break; sleep 0.1; done
done

all="randread-4k-1,randread-4k-16,randwrite-4k-1,randwrite-4k-16,read-1M-1,read-1M-16,write-1M-1,write-1M-16"
"${rt[@]}" "$client" bench "${targets[@]}" --cases "${CASES:-$all}" --secs "$secs" --rounds "${ROUNDS:-5}" \
    --seg-kib "${SEG_KIB:-4}" --queue-size "${QUEUE_SIZE:-1024}" 2>"$dir/client.err" \
    || { cat "$dir/client.err" >&2; exit 1; }
echo
echo "size=$size runtime=${secs}s rounds=${ROUNDS:-5} seg=${SEG_KIB:-4}KiB queue=${QUEUE_SIZE:-1024} rt=${RT:-0} cache.direct=$direct binary=$bin ${DISKIMG_ARGS:-}${bin_b:+ B=$bin_b ${DISKIMG_B_ARGS:-${DISKIMG_ARGS:-}}} commit=$(git rev-parse --short HEAD) $(uptime | sed 's/.*load/load/')"
