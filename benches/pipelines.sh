#!/usr/bin/env bash
# One pass with diskimg against the two-step pipelines used today, on a real 4 GiB image:
#   URL     -> raw/qcow2:  `diskimg convert URL out`  vs  `curl -o tmp URL && qemu-img convert tmp out`
#   .xz/.gz/.zst -> raw/qcow2: `diskimg convert img.xz out`
#                          vs  `xz -dc img.xz > tmp && qemu-img convert tmp out`
#   checksum:              `diskimg checksum` (blkhash, sha256) vs `sha256sum` of the raw file
# and prints seconds, ratio and peak RSS (KiB, /usr/bin/time) per case.
#
# Usage: benches/pipelines.sh      (RUNS=1; the minimum of RUNS runs is reported)
#   BENCH_SRC_DIR=/usr/share  BENCH_SIZE=4G  DISKIMG=path  CASES="xz-qcow2 ..."
# The input (an ext4 image filled from BENCH_SRC_DIR, as benches/compare-qemu.sh makes it)
# and its compressed copies (xz -T2 -1, gzip -1, zstd -1) are cached in target/bench-input/.
# nginx serves the input on 127.0.0.1 for the URL cases (started and stopped here).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-1}
size=${BENCH_SIZE:-4G}
srcdir=${BENCH_SRC_DIR:-/usr/share}
cache=$PWD/target/bench-input
mkdir -p "$cache"
input=$cache/ext4-$size.raw
if [ ! -f "$input" ]; then
    echo "building $input from $srcdir (mkfs.ext4 -d)..." >&2
    truncate -s "$size" "$input.tmp"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$srcdir" "$input.tmp"
    mv "$input.tmp" "$input"
fi
qinput=$cache/ext4-$size.qcow2
[ -f "$qinput" ] || { qemu-img convert -f raw -O qcow2 "$input" "$qinput.tmp"; mv "$qinput.tmp" "$qinput"; }
for c in "xz:xz -T2 -1 -c" "gz:gzip -1 -c" "zst:zstd -q -1 -c"; do
    ext=${c%%:*} cmd=${c#*:}
    if [ ! -f "$input.$ext" ]; then
        echo "compressing $input.$ext ($cmd)..." >&2
        $cmd "$input" >"$input.$ext.tmp" && mv "$input.$ext.tmp" "$input.$ext"
    fi
done
bin=${DISKIMG:-}
if [ -z "$bin" ]; then
    cargo build --release -q -p diskimg-cli
    bin=$PWD/target/release/diskimg
fi
work=$(mktemp -d -p "$PWD/target" bench-pipe.XXXXXX)
ngx=
cleanup() {
    if [ -n "$ngx" ]; then kill "$ngx" 2>/dev/null || true; wait "$ngx" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<CONF
daemon off; worker_processes 2; pid $work/nginx/pid; error_log $work/nginx/error.log;
events { worker_connections 256; }
http { access_log off; sendfile on;
  client_body_temp_path $work/nginx/b; proxy_temp_path $work/nginx/p; fastcgi_temp_path $work/nginx/f;
  uwsgi_temp_path $work/nginx/u; scgi_temp_path $work/nginx/s;
  server { listen 127.0.0.1:$port; location / { root $cache; } } }
CONF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
ngx=$!
for _ in $(seq 100); do
    curl -sfI "http://127.0.0.1:$port/$(basename "$input")" >/dev/null && break
    sleep 0.1
done
url=http://127.0.0.1:$port/$(basename "$input")
qurl=http://127.0.0.1:$port/$(basename "$qinput")

have_time=0
[ -x /usr/bin/time ] && have_time=1
# timed OUT SHELLCMD : "seconds peak_rss_kib" (the largest RSS of the pipeline's
# processes), then `sync OUT` counted in the time.
timed() {
    local out=$1 cmd=$2 rss=-
    rm -f "$out" "$work/tmp"
    sync
    local start end
    start=$(date +%s.%N)
    if [ $have_time = 1 ]; then
        /usr/bin/time -f '%M' -o "$work/rss" bash -c "$cmd" >/dev/null
        rss=$(tail -1 "$work/rss")
    else
        bash -c "$cmd" >/dev/null
    fi
    sync "$out"
    end=$(date +%s.%N)
    echo "$(echo "$end - $start" | bc) $rss"
}
min() { printf '%s\n' "$@" | sort -g | head -1; }

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD), $(nproc) cores, $(uptime | sed 's/.*load/load/')"
echo "# input: $(basename "$input") ($(du -h "$input" | cut -f1) allocated of $size), xz $(du -h "$input.xz" | cut -f1), gz $(du -h "$input.gz" | cut -f1), zst $(du -h "$input.zst" | cut -f1); runs=$runs"
printf '%-14s %10s %10s %8s %12s\n' case two-step diskimg speedup 'rss diskimg'

# case NAME OUTFMT "two-step command" "diskimg command" ; outputs land in $work/o.FMT
case_() {
    local name=$1 fmt=$2 two=$3 one=$4
    if [ -n "${CASES:-}" ] && ! [[ " $CASES " == *" $name "* ]]; then return; fi
    local ta=() tb=() rb=() r
    for _ in $(seq "$runs"); do
        r=$(timed "$work/o.$fmt" "$two"); ta+=("${r% *}")
        if [ "$fmt" != sum ]; then mv "$work/o.$fmt" "$work/ref.$fmt"; fi
        r=$(timed "$work/o.$fmt" "$one"); tb+=("${r% *}"); rb+=("${r#* }")
    done
    local a b
    a=$(min "${ta[@]}") b=$(min "${tb[@]}")
    printf '%-14s %9.2fs %9.2fs %7.2fx %12s\n' "$name" "$a" "$b" "$(echo "scale=2; $a / $b" | bc)" "$(printf '%s\n' "${rb[@]}" | sort -g | tail -1)"
    if [ "$fmt" != sum ] && ! qemu-img compare -q -f "$fmt" -F "$fmt" "$work/ref.$fmt" "$work/o.$fmt"; then
        echo "!! $name: outputs differ" >&2
    fi
    rm -f "$work/o.$fmt" "$work/ref.$fmt" "$work/tmp"
}

# The two-step pipelines write their scratch copy sparse (`dd conv=sparse`): the machine's
# disk is shared, and a sparse scratch file only makes the baseline faster.
tmp_w="dd of=$work/tmp bs=1M conv=sparse status=none"
for fmt in raw qcow2; do
    case_ "url-$fmt" "$fmt" "curl -sf $url | $tmp_w && qemu-img convert -f raw -O $fmt $work/tmp $work/o.$fmt" \
        "$bin convert -O $fmt $url $work/o.$fmt"
done
case_ url-qcow2src raw "curl -sf $qurl | $tmp_w && qemu-img convert -f qcow2 -O raw $work/tmp $work/o.raw" \
    "$bin convert -O raw $qurl $work/o.raw"
for c in "xz:xz -T2 -dc" "gz:gzip -dc" "zst:zstd -q -dc"; do
    ext=${c%%:*} dec=${c#*:}
    for fmt in raw qcow2; do
        case_ "$ext-$fmt" "$fmt" "$dec $input.$ext | $tmp_w && qemu-img convert -f raw -O $fmt $work/tmp $work/o.$fmt" \
            "$bin convert -O $fmt $input.$ext $work/o.$fmt"
    done
done
case_ checksum sum "sha256sum $input > $work/o.sum" "$bin checksum $input > $work/o.sum"
case_ checksum-sha sum "sha256sum $input > $work/o.sum" "$bin checksum -a sha256 $input > $work/o.sum"
case_ checksum-q sum "sha256sum $input > $work/o.sum" "$bin checksum $qinput > $work/o.sum"
case_ checksum-xz sum "xz -T2 -dc $input.xz | sha256sum > $work/o.sum" "$bin checksum -a sha256 $input.xz > $work/o.sum"
