#!/usr/bin/env bash
# Times `diskimg convert` against `qemu-img convert` (and `cp --sparse=always`) on a
# realistic input, alternating the tools run by run, and prints ratios.
#
# Usage: benches/compare-qemu.sh            (RUNS=3 by default)
#   BENCH_SRC_DIR=/usr/share   directory copied into the ext4 input (mkfs.ext4 -d)
#   BENCH_SIZE=4G              virtual size of the input
#   RUNS=3                     runs per tool and case (the minimum is reported)
#   DISKIMG=path               use this binary instead of building target/release/diskimg
#   CASES="raw-qcow2 ..."      subset of cases (names as printed)
#
# Cases: raw→raw, raw→raw with copy offloading (-C, copy_file_range, both tools),
# raw→qcow2, qcow2→raw, raw→vdi/vhdx/vpc, a 1 TiB sparse raw (256 MiB of data) → qcow2,
# and compressed raw→qcow2 / streamOptimized vmdk against `qemu-img convert -c -m 8 -W`
# (diskimg gets the same flags).
#
# The input (a raw ext4 image, and a qcow2 copy made by qemu-img) is cached under
# target/bench-input/. Every timed command is followed by `sync FILE` of its output, so
# all tools pay for writing their data back (diskimg fsyncs at the end of a convert;
# qemu-img convert's default cache mode does not). Peak RSS comes from /usr/bin/time -v
# when present (else it is reported as "-").
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
size=${BENCH_SIZE:-4G}
srcdir=${BENCH_SRC_DIR:-/usr/share}
cache=target/bench-input
mkdir -p "$cache"
input=$cache/ext4-$size.raw
if [ ! -f "$input" ]; then
    echo "building $input from $srcdir (mkfs.ext4 -d)..." >&2
    rm -f "$input.tmp"
    truncate -s "$size" "$input.tmp"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$srcdir" "$input.tmp"
    mv "$input.tmp" "$input"
fi
qinput=$cache/ext4-$size.qcow2
if [ ! -f "$qinput" ]; then
    qemu-img convert -f raw -O qcow2 "$input" "$qinput.tmp"
    mv "$qinput.tmp" "$qinput"
fi
# A 1 TiB sparse raw image with 64 MiB of the input at four places.
sparse=$cache/sparse-1T.raw
if [ ! -f "$sparse" ]; then
    truncate -s 1T "$sparse.tmp"
    for g in 0 300 700 1000; do
        dd if="$input" of="$sparse.tmp" bs=1M skip=130 count=64 seek=$((g * 1024)) \
            conv=notrunc status=none
    done
    mv "$sparse.tmp" "$sparse"
fi
bin=${DISKIMG:-}
if [ -z "$bin" ]; then
    cargo build --release -q -p diskimg-cli
    bin=target/release/diskimg
fi
work=$(mktemp -d -p target bench-out.XXXXXX)
trap 'rm -rf "$work"' EXIT

have_time=0
if [ -x /usr/bin/time ]; then have_time=1; fi

# timed OUT CMD... : prints "seconds peak_rss_kib" of CMD followed by `sync OUT`.
timed() {
    local out=$1
    shift
    rm -f "$out"
    sync
    local start end rss=-
    start=$(date +%s.%N)
    if [ $have_time = 1 ]; then
        /usr/bin/time -f '%M' -o "$work/rss" "$@" >/dev/null
        rss=$(tail -1 "$work/rss")
    else
        "$@" >/dev/null
    fi
    sync "$out"
    end=$(date +%s.%N)
    echo "$(echo "$end - $start" | bc) $rss"
}

min() { printf '%s\n' "$@" | sort -g | head -1; }
max() { printf '%s\n' "$@" | sort -g | tail -1; }

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uptime | sed 's/.*load/load/')"
echo "# input: $input ($(du -h "$input" | cut -f1) allocated of $size, from $srcdir), runs=$runs"
printf '%-22s %9s %9s %7s %9s %7s %9s %9s %s\n' case qemu-img diskimg speedup cp 'dimg/cp' 'rss-q KiB' 'rss-d KiB' 'size d/q'

# case NAME SRCFMT SRC OUTEXT "qemu args" "diskimg args" [cp]
bench_case() {
    local name=$1 sfmt=$2 src=$3 ext=$4 qargs=$5 dargs=$6 withcp=${7:-}
    if [ -n "${CASES:-}" ] && ! [[ " $CASES " == *" $name "* ]]; then return; fi
    local tq=() td=() tc=() rq=() rd=() r
    local qo=$work/q.$ext do=$work/d.$ext co=$work/c.$ext
    for _ in $(seq "$runs"); do
        # shellcheck disable=SC2086
        r=$(timed "$qo" qemu-img convert -f "$sfmt" $qargs "$src" "$qo")
        tq+=("${r% *}"); rq+=("${r#* }")
        # shellcheck disable=SC2086
        r=$(timed "$do" "$bin" convert -f "$sfmt" $dargs "$src" "$do")
        td+=("${r% *}"); rd+=("${r#* }")
        if [ -n "$withcp" ]; then
            r=$(timed "$co" cp --sparse=always "$src" "$co")
            tc+=("${r% *}")
        fi
    done
    local bq bd bc=- cpr=- sizer=-
    bq=$(min "${tq[@]}")
    bd=$(min "${td[@]}")
    if [ -n "$withcp" ]; then
        bc=$(min "${tc[@]}")
        cpr=$(printf '%.2f' "$(echo "scale=3; $bd / $bc" | bc)")
        bc=$(printf '%.2fs' "$bc")
    fi
    if [ "$ext" != raw ]; then
        sizer=$(printf '%.3f' "$(echo "scale=4; $(stat -c %s "$do") / $(stat -c %s "$qo")" | bc)")
    fi
    printf '%-22s %8.2fs %8.2fs %6.2fx %9s %7s %9s %9s %s\n' "$name" "$bq" "$bd" \
        "$(echo "scale=2; $bq / $bd" | bc)" "$bc" "$cpr" "$(max "${rq[@]}")" "$(max "${rd[@]}")" "$sizer"
    # The outputs must hold the same guest content.
    local fmt=$ext
    if [ "$ext" = vhd ]; then fmt=vpc; fi
    if ! qemu-img compare -q -f "$fmt" -F "$fmt" "$qo" "$do"; then
        echo "!! $name: outputs differ" >&2
    fi
    rm -f "$qo" "$do" "$co"
}

bench_case raw-raw raw "$input" raw "-O raw" "-O raw" cp
bench_case raw-raw-C raw "$input" raw "-C -O raw" "-C -O raw" cp
bench_case raw-qcow2 raw "$input" qcow2 "-O qcow2" "-O qcow2" cp
bench_case qcow2-raw qcow2 "$qinput" raw "-O raw" "-O raw"
bench_case raw-vdi raw "$input" vdi "-O vdi" "-O vdi" cp
bench_case raw-vhdx raw "$input" vhdx "-O vhdx" "-O vhdx" cp
bench_case raw-vpc raw "$input" vhd "-O vpc" "-O vpc" cp
bench_case sparse1T-qcow2 raw "$sparse" qcow2 "-O qcow2" "-O qcow2" cp
bench_case raw-qcow2-c raw "$input" qcow2 "-O qcow2 -c -m 8 -W" "-O qcow2 -c -m 8 -W"
bench_case raw-vmdk-stream-c raw "$input" vmdk \
    "-O vmdk -o subformat=streamOptimized -c -m 8 -W" \
    "-O vmdk -o subformat=streamOptimized -c -m 8 -W"
