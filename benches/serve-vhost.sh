#!/usr/bin/env bash
# vhost-user-blk: diskimg serve vs qemu-storage-daemon on copies of the same qcow2 image,
# measured in one run from inside one guest: fio (libaio, O_DIRECT) 4 KiB random read/write
# IOPS and 1 MiB sequential read/write throughput at queue depths 1 and 16, each case
# alternating which server goes first. Prints a markdown table with ratios, each
# server's CPU time per request (host side, /proc/PID/stat over each fio run) and the
# guest's completion interrupts per request for each disk, then the queue limits the
# guest derived from each device.
#
# Usage: benches/serve-vhost.sh [SIZE (default 512M)] [SECONDS per fio run (default 4)]
#   ROUNDS=3       rounds per case; each round runs the disks back to back, the first
#                  disk alternating, so a pair of runs sees the same load. The table
#                  gives the median of each disk and the range of the per-round ratios.
#   DISKIMG=path   the diskimg binary (default target/release/diskimg)
#   CASES=a,b,...  only these cases, named RW-BS-QD (e.g.
#                  randwrite-4k-1,write-1M-16); default all eight
#   DISKIMG_ARGS   extra arguments for `diskimg serve` (e.g. "--cache none")
#   DIRECT=1       O_DIRECT on every server: `--cache none` for diskimg (A and B) and
#                  cache.direct=on for qemu-storage-daemon (default: the page cache,
#                  diskimg's default writeback against qemu-storage-daemon's cache.direct=off)
#   DISKIMG_B=path a second diskimg binary (e.g. a build of main) served as a third disk
#                  (vdc) from its own copy of the image, for an A/B of two builds in one
#                  run: the disks' order rotates per round, and the table gains its
#                  columns (DISKIMG_B_ARGS: its extra arguments, default DISKIMG_ARGS)
# Needs: a release build (cargo build --release -p diskimg-cli), qemu-img, qemu-io,
# qemu-storage-daemon, qemu-system-x86_64, fio (copied into the guest with its
# libraries), busybox-static, python3, and the Debian kernel the guest test caches in
# target/tmp/guest-kernel (fetched with apt-get download when missing).
# The guest boots with KVM (-cpu host); under PVM's /dev/kvm (see docs/serve.md) or with
# DISKIMG_GUEST_ACCEL=tcg it runs under TCG, and then the emulated guest, not the servers,
# sets the pace: read the ratios as "no worse", not as the servers' speed.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-512M}
secs=${2:-4}
rounds=${ROUNDS:-3}
bin=${DISKIMG:-target/release/diskimg}
[ -x "$bin" ] || { echo "build first: cargo build --release -p diskimg-cli" >&2; exit 1; }
bin_b=${DISKIMG_B:-}
[ -z "$bin_b" ] || [ -x "$bin_b" ] || { echo "DISKIMG_B=$bin_b is not executable" >&2; exit 1; }
disks=vda,vdb; [ -n "$bin_b" ] && disks=vda,vdb,vdc
all="randread-4k-1,randread-4k-16,randwrite-4k-1,randwrite-4k-16,read-1M-1,read-1M-16,write-1M-1,write-1M-16"
cases=${CASES:-$all}
for t in qemu-img qemu-io qemu-storage-daemon qemu-system-x86_64 fio busybox python3 \
         apt-get apt-cache dpkg-deb ldd; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }
done
accel=${DISKIMG_GUEST_ACCEL:-kvm}
[ -d /sys/module/kvm_pvm ] && [ -z "${DISKIMG_GUEST_ACCEL:-}" ] && accel=tcg
[ "$accel" = kvm ] && [ ! -w /dev/kvm ] && accel=tcg

dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

# The guest kernel: the guest test's cache, or the package linux-image-amd64 points to.
kdir=target/tmp/guest-kernel
if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
    pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/ *Depends: \(linux-image-.*\)/\1/p' | head -1)
    mkdir -p "$kdir"
    (cd "$kdir" && apt-get download -q "$pkg" >/dev/null)
    dpkg-deb --fsys-tarfile "$kdir"/*.deb | tar -x -C "$kdir" --wildcards './boot/vmlinuz-*' \
        './lib/modules/*/kernel/drivers/virtio' './lib/modules/*/kernel/drivers/block/virtio_blk.ko'
    rm -f "$kdir"/*.deb
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -1)

# The guest's /init: load virtio, run every case on both disks, print terse results.
cat > "$dir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
depmod; modprobe virtio_pci; modprobe virtio_blk
echo GUEST-START
# Completion interrupts of a disk so far: its virtio device's request queues, all CPUs.
irqs() {
    v=$(basename "$(readlink /sys/block/$1/device)")
    awk -v v="$v-req" -v n="$(grep -c ^processor /proc/cpuinfo)" \
        'index($0, v) { for (i = 2; i <= n + 1; i++) s += $i } END { print s + 0 }' /proc/interrupts
}
# What the guest made of each device's limits (a request larger than these is split).
for d in $(echo $DISKS | tr , ' '); do
    q=/sys/block/$d/queue
    echo "QUEUE $d max_segment_size=$(cat $q/max_segment_size) max_segments=$(cat $q/max_segments) max_sectors_kb=$(cat $q/max_sectors_kb)"
done
n=0
for c in $(echo "$CASES" | tr , ' '); do
    set -- $(echo "$c" | tr - ' ')
    for k in $(seq $ROUNDS); do
        # Rotate the disks' order by one per round.
        order=$(echo $DISKS | tr , ' ' | awk -v n=$n '{ for (i = 0; i < NF; i++) printf "%s ", $((i + n) % NF + 1) }')
        n=$((n + 1))
        for d in $order; do
            echo "BEGIN $1-$2-$3 $d"
            i0=$(irqs $d)
            r=$(fio --name=b --filename=/dev/$d --ioengine=libaio --direct=1 --rw=$1 \
                --bs=$2 --iodepth=$3 --time_based --runtime=$SECS --norandommap \
                --randrepeat=0 --output-format=terse --terse-version=3 2>&1 | grep '^3;')
            echo "FIO $1-$2-$3 $d $r"
            echo "IRQ $1-$2-$3 $d $(($(irqs $d) - i0))"
        done
    done
done
echo GUEST-DONE
poweroff -f
EOF

# The initramfs (cpio newc): busybox, /init, fio with its libraries, virtio modules.
python3 - "$dir/initrd" "$dir/init" "$kdir" <<'EOF'
import os, subprocess, sys
out, ino, seen = bytearray(), [0], set()
def entry(name, mode, data):
    ino[0] += 1
    name = name.lstrip("/")
    f = [ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    out.extend(b"070701" + b"".join(b"%08x" % x for x in f) + name.encode() + b"\0")
    while len(out) % 4: out.append(0)
    out.extend(data)
    while len(out) % 4: out.append(0)
def dirs(path):
    cur = ""
    for part in path.strip("/").split("/"):
        cur += "/" + part
        if cur not in seen:
            seen.add(cur); entry(cur, 0o40755, b"")
def put(guest, host, mode=0o755):
    dirs(os.path.dirname(guest)); entry(guest, 0o100000 | mode, open(host, "rb").read())
for d in ["/bin", "/dev", "/proc", "/sys", "/tmp"]: dirs(d)
put("/bin/busybox", subprocess.check_output(["sh", "-c", "command -v busybox"]).decode().strip())
put("/init", sys.argv[2])
fio = subprocess.check_output(["sh", "-c", "command -v fio"]).decode().strip()
put("/bin/fio", fio)
for l in subprocess.check_output(["ldd", fio]).decode().splitlines():
    p = [w for w in l.split() if w.startswith("/")]
    if p: put(p[0], p[0])
root = os.path.join(sys.argv[3], "lib/modules")
for top, _, files in os.walk(root):
    for f in files:
        h = os.path.join(top, f)
        put("/lib/modules/" + os.path.relpath(h, root), h, 0o644)
entry("TRAILER!!!", 0, b"")
open(sys.argv[1], "wb").write(out)
EOF

# A fully allocated qcow2 (64 KiB clusters); each server gets its own copy, both made
# the same way: the page cache holds a file written by qemu-io's one big write in
# large folios, which make every later 4 KiB buffered write several times dearer
# (ext4_block_write_begin walks the folio's buffer heads) than in a copy made by cp.
qemu-img create -q -f qcow2 "$dir/src.qcow2" "$size"
qemu-io -f qcow2 -c "write -P 0x5a 0 $size" "$dir/src.qcow2" >/dev/null
cp "$dir/src.qcow2" "$dir/ours.qcow2"
cp "$dir/src.qcow2" "$dir/theirs.qcow2"
[ -n "$bin_b" ] && cp "$dir/src.qcow2" "$dir/b.qcow2"
rm "$dir/src.qcow2"

direct=off; cache_args=()
if [ -n "${DIRECT:-}" ]; then direct=on; cache_args=(--cache none); fi
# shellcheck disable=SC2086
"$bin" serve --vhost-user-blk "$dir/ours.sock" --num-queues 2 "${cache_args[@]}" ${DISKIMG_ARGS:-} -f qcow2 "$dir/ours.qcow2" & pids+=($!)
qemu-storage-daemon \
    --blockdev "driver=file,node-name=f,filename=$dir/theirs.qcow2,cache.direct=$direct" \
    --blockdev driver=qcow2,node-name=q,file=f \
    --export "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path=$dir/theirs.sock,writable=on,num-queues=2" \
    & pids+=($!)
socks="ours theirs"
if [ -n "$bin_b" ]; then
    # shellcheck disable=SC2086
    "$bin_b" serve --vhost-user-blk "$dir/b.sock" --num-queues 2 "${cache_args[@]}" ${DISKIMG_B_ARGS:-${DISKIMG_ARGS:-}} -f qcow2 "$dir/b.qcow2" & pids+=($!)
    socks="ours theirs b"
fi
for s in $socks; do
    for _ in $(seq 100); do [ -S "$dir/$s.sock" ] && break; sleep 0.1; done
done

# Each server's CPU time (user + system, all threads, /proc/PID/stat) over each fio run:
# the guest prints BEGIN before a run and its FIO result after it, and this filter of the
# console samples the server of that disk at both lines. Under TCG the emulated guest
# sets the pace, so the servers' CPU per request is the load-independent figure.
cpu_monitor='
import os, sys
tick = os.sysconf("SC_CLK_TCK")
pid = dict(zip(["vda", "vdb", "vdc"], sys.argv[1:]))
def cpu(d):
    with open(f"/proc/{pid[d]}/stat") as f:
        t = f.read().rsplit(")", 1)[1].split()
    return (int(t[11]) + int(t[12])) / tick
start = {}
for line in sys.stdin:
    line = line.replace("\r", "")
    sys.stdout.write(line)
    f = line.split()
    if len(f) == 3 and f[0] == "BEGIN":
        start[(f[1], f[2])] = cpu(f[2]) if f[2] in pid else 0
    elif len(f) == 4 and f[0] == "FIO" and (f[1], f[2]) in start:
        print("CPU", f[1], f[2], cpu(f[2]) - start.pop((f[1], f[2])))
    sys.stdout.flush()
'
cpu=(); [ "$accel" = kvm ] && cpu=(-cpu host)
third=(); [ -n "$bin_b" ] && third=(-chardev socket,id=c2,path="$dir/b.sock" -device vhost-user-blk-pci,chardev=c2,num-queues=2)
mem=1G
timeout $((600 + 16 * rounds * (secs + 5) * 20)) qemu-system-x86_64 -accel "$accel" "${cpu[@]}" \
    -m $mem -smp 2 -nodefaults -no-reboot -display none -serial stdio \
    -object memory-backend-memfd,id=mem,size=$mem,share=on -numa node,memdev=mem \
    -kernel "$vmlinuz" -initrd "$dir/initrd" -append "console=ttyS0 panic=-1 quiet SECS=$secs ROUNDS=$rounds CASES=$cases DISKS=$disks" \
    -chardev socket,id=c0,path="$dir/ours.sock" -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
    -chardev socket,id=c1,path="$dir/theirs.sock" -device vhost-user-blk-pci,chardev=c1,num-queues=2 \
    "${third[@]}" </dev/null | python3 -c "$cpu_monitor" "${pids[@]}" > "$dir/console" || true
grep -q GUEST-DONE "$dir/console" || { cat "$dir/console" >&2; echo "the guest did not finish" >&2; exit 1; }

python3 - "$dir/console" <<'EOF'
import statistics, sys
res, cpu, irq, ops = {}, {}, {}, {}
for l in open(sys.argv[1]):
    f = l.split()
    if len(f) == 4 and f[0] in ("CPU", "IRQ"):
        (cpu if f[0] == "CPU" else irq).setdefault((f[1], f[2]), []).append(float(f[3]))
    if len(f) == 4 and f[0] == "FIO":
        t = f[3].split(";")
        if t[4] != "0":
            sys.exit(f"fio error on {f[2]}: {l}")
        rd = int(t[5]) > 0
        iops, kib = (float(t[7]), float(t[6])) if rd else (float(t[48]), float(t[47]))
        res.setdefault((f[1], f[2]), []).append(iops if "-4k-" in f[1] else kib / 1024)
        # Requests completed in the run (fio's total I/O in KiB over the block size).
        n = int(t[5]) if rd else int(t[46])
        ops.setdefault((f[1], f[2]), []).append(n / (4 if "-4k-" in f[1] else 1024))
def per_op(what, case, d):
    c, n = sum(what.get((case, d), [])), sum(ops.get((case, d), []))
    return c / n if n else float("nan")
b3 = any(d == "vdc" for _, d in res)
cols = [("vda", "diskimg serve")] + ([("vdc", "diskimg B")] if b3 else [])
head = "| test | " + " | ".join(n for _, n in cols) + " | qemu-storage-daemon | "
head += " | ".join(f"{n}: ratio | per-round ratios" for _, n in cols)
names = " / ".join(["diskimg"] + (["B"] if b3 else []) + ["qsd"])
head += f" | server CPU µs per request: {names} | guest interrupts per request: {names} |"
print(head)
print("|---" * (head.count("|") - 1) + "|")
for case in ["randread-4k-1", "randread-4k-16", "randwrite-4k-1", "randwrite-4k-16",
             "read-1M-1", "read-1M-16", "write-1M-1", "write-1M-16"]:
    if (case, "vda") not in res:
        continue
    b = res[(case, "vdb")]
    mb = statistics.median(b)
    rw, bs, qd = case.split("-")
    unit = "IOPS" if bs == "4k" else "MiB/s"
    row = f"| {rw} {bs} QD{qd} ({unit}) | "
    row += " | ".join(f"{statistics.median(res[(case, d)]):.0f}" for d, _ in cols) + f" | {mb:.0f} | "
    for d, _ in cols:
        a = res[(case, d)]
        rounds = sorted(x / max(y, 1e-9) for x, y in zip(a, b))
        row += f"{statistics.median(a) / max(mb, 1e-9):.2f}x | {rounds[0]:.2f}–{rounds[-1]:.2f} | "
    ds = [d for d, _ in cols] + ["vdb"]
    row += " / ".join(f"{per_op(cpu, case, d) * 1e6:.0f}" for d in ds) + " | "
    row += " / ".join(f"{per_op(irq, case, d):.2f}" for d in ds) + " |"
    print(row)
EOF
echo
sed -n 's/^QUEUE vda/guest queue limits: diskimg (vda)/p; s/^QUEUE vdb/guest queue limits: qemu-storage-daemon (vdb)/p; s/^QUEUE vdc/guest queue limits: diskimg B (vdc)/p' "$dir/console"
echo "size=$size runtime=${secs}s rounds=$rounds accel=$accel cache.direct=$direct binary=$bin ${DISKIMG_ARGS:-}${bin_b:+ B=$bin_b ${DISKIMG_B_ARGS:-}} commit=$(git rev-parse --short HEAD) $(uptime | sed 's/.*load/load/')"
