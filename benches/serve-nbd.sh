#!/usr/bin/env bash
# diskimg serve vs qemu-nbd on the same qcow2 image, in one run: fio (nbd engine) 4 KiB
# random read/write IOPS and 1 MiB sequential read/write throughput at queue depths 1 and
# 16, then nbdcopy of the whole export to null:. Prints a markdown table with ratios.
#
# Usage: benches/serve-nbd.sh [SIZE (default 1G)] [SECONDS per fio run (default 5)]
#   ROUNDS=3   fio runs per case and server (nbdcopy: ROUNDS + 2), alternating which server
#              goes first; the table gives medians and the range of per-round ratios
# Needs: a release build (cargo build --release -p diskimg-cli), qemu-img, qemu-nbd, fio,
# nbdcopy. Both servers: unix socket, writeback cache, one shared image file each (copies
# of the same image), default thread settings.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1G}
secs=${2:-5}
bin=target/release/diskimg
[ -x "$bin" ] || { echo "build first: cargo build --release -p diskimg-cli" >&2; exit 1; }
for t in qemu-img qemu-nbd fio nbdcopy; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }
done
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

# A fully allocated qcow2 (64 KiB clusters) with random data.
qemu-img create -q -f qcow2 "$dir/src.qcow2" "$size"
qemu-io -f qcow2 -c "write -P 0x5a 0 $size" "$dir/src.qcow2" >/dev/null
cp "$dir/src.qcow2" "$dir/ours.qcow2"
cp "$dir/src.qcow2" "$dir/theirs.qcow2"

"$bin" serve -t -e 0 -f qcow2 -k "$dir/ours.sock" "$dir/ours.qcow2" & pids+=($!)
qemu-nbd -t -e 0 -f qcow2 --cache=writeback -k "$dir/theirs.sock" "$dir/theirs.qcow2" & pids+=($!)
for s in ours theirs; do
    for _ in $(seq 100); do [ -S "$dir/$s.sock" ] && break; sleep 0.1; done
done

# fio_run NAME RW BS DEPTH SOCK -> IOPS (4k) or MiB/s (1M)
fio_run() {
    local rw=$1 bs=$2 qd=$3 sock=$4
    local out
    out=$(fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --time_based --runtime="$secs" --size="$size" --output-format=json \
        --verify=0 2>/dev/null)
    python3 -c '
import json, sys
s = sys.stdin.read()
j = json.loads(s[s.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
unit = sys.argv[1]
print(round(side["iops"]) if unit == "iops" else round(side["bw_bytes"] / 1048576))
' "$([ "$bs" = 4k ] && echo iops || echo mib)" <<<"$out"
}

# median of the arguments
med() { python3 -c 'import statistics, sys; m = statistics.median(float(a) for a in sys.argv[1:]); print(f"{m:.0f}" if m >= 100 else f"{m:.2f}")' "$@"; }
# ratio A B [invert]: "R.RRx (lo–hi)" of the medians and the per-round ratios of two lists
ratios() {
    python3 - "$@" <<'PY'
import statistics, sys
a = [float(x) for x in sys.argv[1].split()]
b = [float(x) for x in sys.argv[2].split()]
inv = len(sys.argv) > 3
r = [(y / x if inv else x / y) for x, y in zip(a, b)]
m = statistics.median(b) / statistics.median(a) if inv else statistics.median(a) / statistics.median(b)
print(f"{m:.2f}x | {min(r):.2f}–{max(r):.2f}")
PY
}

rounds=${ROUNDS:-3}
echo "| test | diskimg serve | qemu-nbd | ratio | per-round ratios |"
echo "|---|---|---|---|---|"
for case in "randread 4k 1" "randread 4k 16" "randwrite 4k 1" "randwrite 4k 16" \
            "read 1M 1" "read 1M 16" "write 1M 1" "write 1M 16"; do
    set -- $case
    as=(); bs=()
    # Rounds alternate which server goes first.
    for ((r = 0; r < rounds; r++)); do
        if ((r % 2 == 0)); then
            as+=("$(fio_run "$1" "$2" "$3" "$dir/ours.sock")")
            bs+=("$(fio_run "$1" "$2" "$3" "$dir/theirs.sock")")
        else
            bs+=("$(fio_run "$1" "$2" "$3" "$dir/theirs.sock")")
            as+=("$(fio_run "$1" "$2" "$3" "$dir/ours.sock")")
        fi
    done
    unit=$([ "$2" = 4k ] && echo IOPS || echo MiB/s)
    echo "| $1 $2 QD$3 ($unit) | $(med "${as[@]}") | $(med "${bs[@]}") | $(ratios "${as[*]}" "${bs[*]}") |"
done
t() { local s=$(date +%s.%N); nbdcopy "nbd+unix:///?socket=$1" null: ; python3 -c "import time; print(f'{time.time() - $s:.3f}')"; }
as=(); bs=()
for ((r = 0; r < rounds + 2; r++)); do
    if ((r % 2 == 0)); then as+=("$(t "$dir/ours.sock")"); bs+=("$(t "$dir/theirs.sock")")
    else bs+=("$(t "$dir/theirs.sock")"); as+=("$(t "$dir/ours.sock")"); fi
done
echo "| nbdcopy whole image to null: (s, lower is better) | $(med "${as[@]}") | $(med "${bs[@]}") | $(ratios "${as[*]}" "${bs[*]}" inv) |"
echo
echo "size=$size runtime=${secs}s rounds=$rounds (nbdcopy: $((rounds + 2))) commit=$(git rev-parse --short HEAD) $(uptime | sed 's/.*load/load/')"
