#!/usr/bin/env bash
# Times `diskimg convert` against `qemu-img convert` on realistic inputs, alternating
# the tools run by run, and prints one table with ratios (qemu-img time / diskimg time).
#
# Every row has two times per tool: "ret", until the command returns, and "dur", until
# its output is durable (the return plus `sync OUTPUT`, which writes back whatever the
# tool left in the page cache). diskimg's default returns durable; qemu-img's default
# (-t unsafe) returns with its data still in the page cache. Rows marked `-t unsafe`
# give both tools that mode, so "ret" compares like with like.
#
# Usage: benches/compare-qemu.sh            (as root for the big and loop-device cases)
#   RUNS=3              runs per tool and case (the fastest is reported, see STAT)
#   CASES="a b ..."     only these cases (names as printed)
#   BIG=1               the larger-than-dirty-limits case (needs root: XFS image, mount)
#   BIG_DATA_GIB=8      GiB of data in its 100 GiB sparse source (0.76 GiB per copy)
#   BIG_RUNS=1          runs of the big case per tool
#                       (its cases: big-qcow2 = each tool's default, big-qcow2-none = -t none,
#                       big-qcow2-unsafe = -t unsafe, big-qcow2-wb = -t writeback on both sides;
#                       big-qcow2-direct = -T none -t none, big-qcow2-none-Twb = -T writeback
#                       -t none, big-qcow2-unsafe-Twb = -T writeback -t unsafe on both sides;
#                       big-ceiling = fio's O_DIRECT read/write/mixed rows on the same device
#                       first, only when named in CASES; CEIL_GIB=4 GiB per fio job)
#   MIN_FREE_GIB=15     the big case is skipped unless this much disk stays free (its
#                       outputs exist one at a time: qemu-img's is deleted before diskimg runs)
#   LOOP=1              the loop-device target case with -t none (needs root, losetup)
#   BENCH_MEM=512M      run every timed command in a memory cgroup of this size (needs root;
#                       cgroup v1 or v2): its page cache, the source's and the output's dirty
#                       pages included, cannot grow past it, so BIG_DATA_GIB=3 is larger
#                       than the page cache on any machine (a stand-in for the 8 GiB case)
#   BIG_LOOP_DIO=1      the big case's XFS image sits on a loop device with --direct-io=on
#                       (0: `mount -o loop`, buffered: one kernel thread copies every request
#                       into the host page cache, which then holds all the data, so the case
#                       is neither larger than the page cache nor sensitive to queue depth)
#   BENCH_RT=1          timed commands run at real-time priority (chrt -f 10), so that other
#                       work on a shared machine does not decide the times
#   STAT=min            report the fastest run of each tool (median: the middle one)
#   BENCH_SRC_DIR=/usr/share, BENCH_SIZE=4G   the ext4 input (mkfs.ext4 -d)
#   DISKIMG=path        use this binary instead of building target/release/diskimg
#   DISKIMG_B=path      also time this binary (after diskimg, each run): a second row
#                       "NAME (B)" against the same qemu-img runs (an A/B in one run)
#
# Inputs are cached under target/bench-input/: a raw ext4 image of BENCH_SRC_DIR, qemu-img's
# qcow2, compressed qcow2 and streamOptimized VMDK copies of it, a 1 TiB sparse raw. The big
# case builds (and afterwards unmounts and deletes) a sparse XFS image holding a 100 GiB
# sparse raw whose data are reflinked copies of the ext4 image (so it costs about 0.8 GiB
# of disk; its output costs BIG_DATA_GIB), and drops the source from the page cache before
# every run (`dd iflag=nocache`). Peak RSS comes from /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
size=${BENCH_SIZE:-4G}
srcdir=${BENCH_SRC_DIR:-/usr/share}
cache=target/bench-input
mkdir -p "$cache"
for tool in qemu-img bc /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

# make OUT CMD...: runs CMD (writing OUT.tmp) once, then renames; cached inputs.
make_input() {
    local out=$1
    shift
    if [ ! -f "$out" ]; then
        echo "building $out..." >&2
        rm -f "$out.tmp"
        "$@"
        mv "$out.tmp" "$out"
    fi
}
input=$cache/ext4-$size.raw
make_input "$input" sh -c "truncate -s $size '$input.tmp' && mkfs.ext4 -q -F \
    -E lazy_itable_init=0,lazy_journal_init=0 -d '$srcdir' '$input.tmp'"
qinput=$cache/ext4-$size.qcow2
make_input "$qinput" qemu-img convert -f raw -O qcow2 "$input" "$qinput.tmp"
cinput=$cache/ext4-$size-c.qcow2
make_input "$cinput" qemu-img convert -c -m 8 -W -f raw -O qcow2 "$input" "$cinput.tmp"
vinput=$cache/ext4-$size-stream.vmdk
make_input "$vinput" qemu-img convert -m 8 -W -f raw -O vmdk \
    -o subformat=streamOptimized "$input" "$vinput.tmp"
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
bin=$(realpath "$bin")
bin_b=
if [ -n "${DISKIMG_B:-}" ]; then bin_b=$(realpath "$DISKIMG_B"); fi
work=$(mktemp -d -p target bench-out.XXXXXX)
mnt=
loopdev=
memcg=
# make_memcg BYTES: a memory cgroup below this shell's (v1), or below the root (v2, where
# a cgroup holding processes cannot hand controllers to its children); prints its path.
make_memcg() {
    local rel dir
    rel=$(awk -F: '$2 == "memory" { print $3 }' /proc/self/cgroup)
    if [ -n "$rel" ]; then
        dir=/sys/fs/cgroup/memory${rel%/}/diskimg-bench.$$
        mkdir "$dir" && echo "$1" >"$dir/memory.limit_in_bytes"
    else
        echo +memory >/sys/fs/cgroup/cgroup.subtree_control
        dir=/sys/fs/cgroup/diskimg-bench.$$
        mkdir "$dir" && echo "$1" >"$dir/memory.max"
    fi
    echo "$dir"
}
if [ -n "${BENCH_MEM:-}" ]; then
    memcg=$(make_memcg "$(numfmt --from=iec "$BENCH_MEM")")
fi
# What timed commands run under: a shell that moves itself into $memcg and then execs
# the command (when BENCH_MEM is set).
in_memcg=()
if [ -n "$memcg" ]; then
    # shellcheck disable=SC2016
    in_memcg=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$memcg")
fi
if [ "${BENCH_RT:-0}" = 1 ]; then in_memcg+=(chrt -f 10); fi
cleanup() {
    set +e
    if [ -n "$memcg" ]; then rmdir "$memcg"; fi
    if [ -n "$mnt" ] && mountpoint -q "$mnt"; then umount "$mnt"; fi
    if [ -n "$loopdev" ]; then losetup -d "$loopdev"; fi
    rm -rf "$work" "$cache/big-xfs.img" "$cache/big-mnt"
}
trap cleanup EXIT

# timed OUT CMD...: prints "return_s durable_s peak_rss_kib cpu_s" of CMD (cpu: user +
# system seconds of the command itself, which a loaded machine does not inflate), then
# `sync OUT`.
timed() {
    local out=$1
    shift
    if [ -f "$out" ]; then rm -f "$out"; fi
    sync
    local start ret end
    start=$(date +%s.%N)
    /usr/bin/time -f '%M %U %S' -o "$work/rss" "${in_memcg[@]}" "$@" >/dev/null
    ret=$(date +%s.%N)
    sync "$out"
    end=$(date +%s.%N)
    local rss u sy
    read -r rss u sy < <(tail -1 "$work/rss")
    echo "$(echo "$ret - $start" | bc) $(echo "$end - $start" | bc) $rss $(echo "$u + $sy" | bc)"
}

min() {
    if [ "${STAT:-min}" = median ]; then
        printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
    else
        printf '%s\n' "$@" | sort -g | head -1
    fi
}
max() { printf '%s\n' "$@" | sort -g | tail -1; }
ratio() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc)"; }

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uptime | sed 's/.*load/load/')"
echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $("$bin" --version 2>/dev/null | head -1), $(qemu-img --version | head -1)"
if [ -n "$bin_b" ]; then echo "# B: $bin_b"; fi
echo "# input: $input ($(du -hL "$input" | cut -f1) allocated of $size, from $srcdir), runs=$runs"
if [ -n "$memcg" ]; then echo "# every run in a memory cgroup of BENCH_MEM=$BENCH_MEM ($memcg)"; fi
rt=
if [ "${BENCH_RT:-0}" = 1 ]; then rt=", real-time priority (chrt -f 10)"; fi
echo "# times: ${STAT:-min} of the runs$rt"
echo
echo "| case | qemu ret | qemu dur | dimg ret | dimg dur | × ret | × dur | CPU qemu | CPU dimg | × CPU | RSS qemu | RSS dimg | size d/q |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"

# bench_case NAME SFMT SRC OFMT "qemu args" "diskimg args" [OUT] [PREP] [RUNS] [SOLO]
#   OUT: a fixed output (a device) instead of files in $work; PREP: a command run before
#   every timed run (dropping the source from the page cache, discarding a device);
#   SOLO=1: only one output on disk at a time (qemu-img's is measured and deleted before
#   diskimg runs; diskimg's is compared with the source).
bench_case() {
    local name=$1 sfmt=$2 src=$3 ofmt=$4 qargs=$5 dargs=$6 fixed=${7:-} prep=${8:-true}
    local n=${9:-$runs} solo=${10:-0}
    if [ -n "${CASES:-}" ] && ! [[ " $CASES " == *" $name "* ]]; then return; fi
    local qr=() qd=() dr=() dd=() rq=() rd=() cq=() cd=() r qsize=0
    local br=() bd=() rb=() cb=()
    local ext=$ofmt
    if [ "$ofmt" = vpc ]; then ext=vhd; fi
    local qo=${fixed:-$work/q.$ext} do=${fixed:-$work/d.$ext} same=0
    if [ -n "$fixed" ]; then same=1; fi
    for i in $(seq "$n"); do
        $prep
        # shellcheck disable=SC2086
        r=$(timed "$qo" qemu-img convert -f "$sfmt" -O "$ofmt" $qargs "$src" "$qo")
        read -r a b c e <<<"$r"
        qr+=("$a"); qd+=("$b"); rq+=("$c"); cq+=("$e")
        if [ $same = 1 ] && [ "$i" = "$n" ] && ! qemu-img compare -q -f "$sfmt" -F "$ofmt" "$src" "$qo"; then
            echo "!! $name: qemu-img's output differs from the source" >&2
        fi
        if [ "$solo" = 1 ]; then
            qsize=$(stat -c %s "$qo")
            rm -f "$qo"
        fi
        $prep
        # shellcheck disable=SC2086
        r=$(timed "$do" "$bin" convert -f "$sfmt" -O "$ofmt" $dargs "$src" "$do")
        read -r a b c e <<<"$r"
        dr+=("$a"); dd+=("$b"); rd+=("$c"); cd+=("$e")
        if [ -n "$bin_b" ]; then
            # The other binary, on the same output path (removed first by `timed`).
            $prep
            # shellcheck disable=SC2086
            r=$(timed "$do" "$bin_b" convert -f "$sfmt" -O "$ofmt" $dargs "$src" "$do")
            read -r a b c e <<<"$r"
            br+=("$a"); bd+=("$b"); rb+=("$c"); cb+=("$e")
        fi
    done
    local bqr bqd bdr bdd sizer=-
    bqr=$(min "${qr[@]}"); bqd=$(min "${qd[@]}")
    bdr=$(min "${dr[@]}"); bdd=$(min "${dd[@]}")
    local bcq bcd
    bcq=$(min "${cq[@]}"); bcd=$(min "${cd[@]}")
    if [ $same = 0 ] && [ "$ofmt" != raw ]; then
        if [ "$solo" = 0 ]; then qsize=$(stat -c %s "$qo"); fi
        sizer=$(printf '%.3f' "$(echo "scale=4; $(stat -c %s "$do") / $qsize" | bc)")
    fi
    printf '| %s | %.2f s | %.2f s | %.2f s | %.2f s | **%s×** | **%s×** | %.2f s | %.2f s | %s× | %d MB | %d MB | %s |\n' \
        "$name" "$bqr" "$bqd" "$bdr" "$bdd" "$(ratio "$bqr" "$bdr")" "$(ratio "$bqd" "$bdd")" \
        "$bcq" "$bcd" "$(ratio "$bcq" "$bcd")" \
        "$(($(max "${rq[@]}") / 1024))" "$(($(max "${rd[@]}") / 1024))" "$sizer"
    if [ -n "$bin_b" ]; then
        local b1 b2 b3
        b1=$(min "${br[@]}"); b2=$(min "${bd[@]}"); b3=$(min "${cb[@]}")
        printf '| %s (B) | %.2f s | %.2f s | %.2f s | %.2f s | **%s×** | **%s×** | %.2f s | %.2f s | %s× | %d MB | %d MB | - |\n' \
            "$name" "$bqr" "$bqd" "$b1" "$b2" "$(ratio "$bqr" "$b1")" "$(ratio "$bqd" "$b2")" \
            "$bcq" "$b3" "$(ratio "$bcq" "$b3")" \
            "$(($(max "${rq[@]}") / 1024))" "$(($(max "${rb[@]}") / 1024))"
    fi
    # The outputs must hold the source's guest content.
    local other=$qo ofmt2=$ofmt
    if [ $same = 1 ] || [ "$solo" = 1 ]; then other=$src; ofmt2=$sfmt; fi
    if ! qemu-img compare -q -f "$ofmt2" -F "$ofmt" "$other" "$do"; then
        echo "!! $name: outputs differ" >&2
    fi
    if [ $same = 0 ]; then rm -f "$qo" "$do"; fi
}

unsafe="-t unsafe"
# Uncompressed: each tool's default, then -t unsafe on both sides.
for c in "raw-raw raw $input raw" "raw-qcow2 raw $input qcow2" "qcow2-raw qcow2 $qinput raw" \
    "raw-vdi raw $input vdi" "raw-vhdx raw $input vhdx" "raw-vpc raw $input vpc" \
    "sparse1T-qcow2 raw $sparse qcow2"; do
    read -r name sfmt src ofmt <<<"$c"
    bench_case "$name" "$sfmt" "$src" "$ofmt" "" ""
    bench_case "$name-unsafe" "$sfmt" "$src" "$ofmt" "$unsafe" "$unsafe"
done
bench_case raw-raw-C raw "$input" raw "-C" "-C"
# Compressed: diskimg with no flags against qemu-img's fastest settings.
bench_case raw-qcow2-c raw "$input" qcow2 "-c -m 8 -W" "-c"
bench_case raw-qcow2-c-mW raw "$input" qcow2 "-c -m 8 -W" "-c -m 8 -W"
stream="-o subformat=streamOptimized"
bench_case raw-vmdk-stream raw "$input" vmdk "$stream -m 8 -W" "$stream"
bench_case qcow2c-raw qcow2 "$cinput" raw "" ""
bench_case qcow2c-raw-unsafe qcow2 "$cinput" raw "$unsafe" "$unsafe"
bench_case vmdkstream-raw vmdk "$vinput" raw "" ""

# A loop device as the target, O_DIRECT on both sides (-n: the device exists).
if [ "${LOOP:-1}" = 1 ] && { [ -z "${CASES:-}" ] || [[ " $CASES " == *" loop-none "* ]]; }; then
    truncate -s "$size" "$work/loop.img"
    loopdev=$(losetup --direct-io=on -f --show "$work/loop.img" 2>/dev/null ||
        losetup -f --show "$work/loop.img")
    discard() { blkdiscard -f "$loopdev" 2>/dev/null || true; }
    bench_case loop-none raw "$input" raw "-n -t none" "-n -t none" "$loopdev" discard
    losetup -d "$loopdev"
    loopdev=
    rm -f "$work/loop.img"
fi

# Larger than the dirty limits: a 100 GiB sparse raw with BIG_DATA_GIB of data, cold.
gib=${BIG_DATA_GIB:-8}
free_gib=$(($(df -k --output=avail "$cache" | tail -1) / 1048576))
run_big=0
if [ "${BIG:-1}" = 1 ] && { [ -z "${CASES:-}" ] || [[ " $CASES " == *" big-"* ]]; }; then
    run_big=1
    if [ $((free_gib - gib - 1)) -lt "${MIN_FREE_GIB:-15}" ]; then
        echo "# big: skipped: $free_gib GiB free, the case needs $((gib + 1)) GiB and must leave MIN_FREE_GIB=${MIN_FREE_GIB:-15} (BIG_DATA_GIB=$gib)"
        run_big=0
    fi
fi
# fio_row LABEL FIO-ARGS...: one fio run of one or more jobs (run at once) on the big
# case's file system; prints a row: MB/s of the reading and the writing jobs, the wall
# time until all finish, and that time scaled to the big case's BIG_DATA_GIB.
fio_row() {
    local label=$1
    shift
    fio --output-format=json --direct=1 --bs=2M --fallocate=none "$@" >"$work_saved/fio.json"
    python3 - "$label" "$ceil_gib" "$gib" "$work_saved/fio.json" <<'PY'
import json, sys
label, ceil, gib, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
text = open(path).read()
jobs = json.loads(text[text.index("{"):])["jobs"]  # fio may print a job line first
rd = sum(j["read"]["bw_bytes"] for j in jobs) / 1e6
wr = sum(j["write"]["bw_bytes"] for j in jobs) / 1e6
wall = max(j["job_runtime"] for j in jobs) / 1000
fmt = lambda v: f"{v:.0f} MB/s" if v else "-"
print(f"| {label} | {fmt(rd)} | {fmt(wr)} | {wall:.2f} s | {wall * gib / ceil:.2f} s |")
PY
}

# The device's ceiling under the big case's load (CASES="big-ceiling"): O_DIRECT 2 MiB
# sequential reads of a CEIL_GIB file, writes of a new file (allocating, as a growing
# qcow2), and both at once, at the queue depths the tools use (qemu-img: 8 reads, one
# write in flight; diskimg -t none: 8 reads, 4 writes), then the real source read alone.
big_ceiling() {
    ceil_gib=${CEIL_GIB:-4}
    local c=$mnt/ceil sz=${ceil_gib}G
    # The data the big case moves (its reflinked copies), in GiB.
    gib=$(qemu-img map -f raw --output=json "$big" | python3 -c \
        'import json,sys; print("%.2f" % (sum(e["length"] for e in json.load(sys.stdin) if e["data"]) / 2**30))')
    echo "# ceiling: fio $(fio --version), O_DIRECT 2 MiB sequential, $ceil_gib GiB per job, on $mnt; last column: the wall time scaled to $gib GiB"
    echo
    echo "| load | read | write | wall | × $gib GiB |"
    echo "|---|---|---|---|---|"
    fio_row "write new file, QD1" --name=w --filename="$c.src" --rw=write --size="$sz" --ioengine=psync
    fio_row "write new file, QD4" --name=w --filename="$c.dst" --rw=write --size="$sz" --ioengine=libaio --iodepth=4
    rm -f "$c.dst"; fstrim "$mnt" 2>/dev/null || true
    fio_row "read, QD1" --name=r --filename="$c.src" --rw=read --size="$sz" --ioengine=psync
    fio_row "read, QD8" --name=r --filename="$c.src" --rw=read --size="$sz" --ioengine=libaio --iodepth=8
    local qd
    for qd in 1 4; do
        fio_row "read QD8 + write new file QD$qd" --name=r --filename="$c.src" --rw=read --size="$sz" \
            --ioengine=libaio --iodepth=8 --name=w --filename="$c.dst" --rw=write --size="$sz" \
            --ioengine=libaio --iodepth=$qd
        rm -f "$c.dst"; fstrim "$mnt" 2>/dev/null || true
    done
    rm -f "$c.src"; fstrim "$mnt" 2>/dev/null || true
    local t0 t1 tc
    for tc in none writeback; do
        dd if="$big" iflag=nocache count=0 status=none
        t0=$(date +%s.%N)
        qemu-img convert -n -f raw -T $tc "$big" --target-image-opts \
            "driver=null-co,size=$(stat -c %s "$big")"
        t1=$(date +%s.%N)
        printf '| the big source read alone (qemu-img -T %s → null-co) | %.0f MB/s | - | %.2f s | %.2f s |\n' \
            "$tc" "$(echo "$gib * 1073.741824 / ($t1 - $t0)" | bc -l)" "$(echo "$t1 - $t0" | bc)" "$(echo "$t1 - $t0" | bc)"
    done
    echo
    gib=${BIG_DATA_GIB:-8}
}
if [ "$run_big" = 1 ]; then
    copies=$(((gib * 100 + 75) / 76))
    if [ "$copies" -gt 25 ]; then copies=25; fi
    img=$cache/big-xfs.img
    mnt=$cache/big-mnt
    rm -f "$img"
    truncate -s 200G "$img"
    mkfs.xfs -q -m reflink=1 "$img"
    mkdir -p "$mnt"
    if [ "${BIG_LOOP_DIO:-1}" = 1 ]; then
        loopdev=$(losetup --direct-io=on -f --show "$img")
        mount "$loopdev" "$mnt"
    else
        mount -o loop "$img" "$mnt"
    fi
    cp --sparse=always "$input" "$mnt/ext4.raw"
    big=$mnt/big.raw
    truncate -s 100G "$big"
    step=$((100 / copies / 4 * 4))
    for k in $(seq 0 $((copies - 1))); do
        xfs_io -c "reflink $mnt/ext4.raw 0 $((k * step))G $size" "$big" >/dev/null
    done
    sync
    echo "# big: $big (XFS on $(if [ -n "$loopdev" ]; then echo "a direct-io loop device"; else echo "a buffered loop device"; fi)), 100 GiB virtual, $copies reflinked copies ($(qemu-img map -f raw --output=json "$big" | grep -c '"data": true') data extents), dirty limits: ratio $(cat /proc/sys/vm/dirty_ratio)%, background $(cat /proc/sys/vm/dirty_background_ratio)% of $(free -g | awk '/Mem:/{print $2}') GiB"
    # Deleted outputs free the image's space only when trimmed.
    cold() {
        fstrim "$mnt" 2>/dev/null || true
        dd if="$big" iflag=nocache count=0 status=none
    }
    work_saved=$work
    work=$mnt
    if [[ " ${CASES:-} " == *" big-ceiling "* ]]; then big_ceiling; fi
    n=${BIG_RUNS:-1}
    bench_case big-qcow2 raw "$big" qcow2 "" "" "" cold "$n" 1
    bench_case big-qcow2-none raw "$big" qcow2 "-t none" "-t none" "" cold "$n" 1
    # The same cache mode on both sides for the page-cache case: qemu-img's default
    # (unsafe: compare "ret") and writeback (every flush honoured, durable on return).
    bench_case big-qcow2-unsafe raw "$big" qcow2 "$unsafe" "$unsafe" "" cold "$n" 1
    bench_case big-qcow2-wb raw "$big" qcow2 "-t writeback" "-t writeback" "" cold "$n" 1
    # Source cache modes given on both sides: -T none (O_DIRECT reads, which diskimg uses
    # by default for a raw source larger than the dirty limits) and -T writeback.
    bench_case big-qcow2-direct raw "$big" qcow2 "-T none -t none" "-T none -t none" "" cold "$n" 1
    bench_case big-qcow2-none-Twb raw "$big" qcow2 "-T writeback -t none" "-T writeback -t none" "" cold "$n" 1
    bench_case big-qcow2-unsafe-Twb raw "$big" qcow2 "-T writeback -t unsafe" "-T writeback -t unsafe" "" cold "$n" 1
    work=$work_saved
    umount "$mnt"
    if [ -n "$loopdev" ]; then losetup -d "$loopdev"; fi
    loopdev=
    rm -rf "$img" "$mnt"
    mnt=
fi
echo "# end: $(date -u '+%H:%M UTC'), $(uptime | sed 's/.*load/load/')"
