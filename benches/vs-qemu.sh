#!/usr/bin/env bash
# Times `diskimg convert` against `qemu-img convert` on one input.
#
# Usage: benches/vs-qemu.sh [INPUT [FORMAT]]
# Without INPUT, makes a 1 GiB raw image in a temp dir: 256 MiB of random data in
# 4 MiB runs with holes between them. Builds diskimg in release mode first, unless
# DISKIMG names a binary to use.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${DISKIMG:-}
if [ -z "$bin" ]; then
    cargo build --release -q -p diskimg-cli
    bin=target/release/diskimg
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=${1:-}
fmt=${2:-raw}
if [ -z "$src" ]; then
    src=$tmp/input.raw
    qemu-img create -q -f raw "$src" 1G
    for i in $(seq 0 63); do
        dd if=/dev/urandom of="$src" bs=4M count=1 seek=$((i * 4)) conv=notrunc status=none
    done
fi
run() {
    local name=$1
    shift
    local start end
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    printf '%-32s %6.2f s\n' "$name" "$(echo "$end - $start" | bc)"
}
sync
run "qemu-img convert -O $fmt" qemu-img convert -f raw -O "$fmt" "$src" "$tmp/q.$fmt"
run "diskimg convert -O $fmt" "$bin" convert -f raw -O "$fmt" "$src" "$tmp/d.$fmt"
run "diskimg convert -m 1 -O $fmt" "$bin" convert -m 1 -f raw -O "$fmt" "$src" "$tmp/d1.$fmt"
run "qemu-img compare" qemu-img compare -f "$fmt" -F "$fmt" "$tmp/q.$fmt" "$tmp/d.$fmt"
run "diskimg compare" "$bin" compare -f "$fmt" -F "$fmt" "$tmp/q.$fmt" "$tmp/d.$fmt"
