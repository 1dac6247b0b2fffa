#!/bin/sh
# Builds seed corpora for every fuzz target under fuzz/corpus/<target>/ (git-ignored) from
# tiny qemu-img-made images plus the qemu-iotests samples in tests/corpus.
# Usage: fuzz/make_seeds.sh   (needs qemu-img, qemu-io, python3)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
c=$here/corpus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
Q="qemu-img"
io() { qemu-io "$@" >/dev/null; }

$Q create -q -f raw pat.raw 64K
io -f raw -c 'write -P 0x5a 0 16k' -c 'write -P 0x11 32k 4k' pat.raw
$Q create -q -f raw base.raw 64K

# qcow2: small clusters keep inputs short
$Q create -q -f qcow2 -o cluster_size=512 q_plain.qcow2 64K
$Q create -q -f qcow2 -o cluster_size=512,compat=0.10 q_v2.qcow2 64K
$Q create -q -f qcow2 -o cluster_size=512,refcount_bits=1 q_rc1.qcow2 64K
$Q create -q -f qcow2 -o cluster_size=512,refcount_bits=64 q_rc64.qcow2 64K
$Q create -q -f qcow2 -o cluster_size=512,lazy_refcounts=on q_lazy.qcow2 64K
$Q create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw q_backing.qcow2 64K
$Q create -q -f qcow2 -o cluster_size=512,data_file=data.raw,data_file_raw=on q_datafile.qcow2 64K
$Q create -q -f qcow2 -o cluster_size=512 q_data.qcow2 64K
io -c 'write -P 0xab 0 4k' -c 'write -z 8k 2k' -c 'write -P 1 20k 1k' q_data.qcow2
cp q_data.qcow2 q_snap.qcow2
$Q snapshot -c s1 q_snap.qcow2
io -c 'write -P 2 0 1k' q_snap.qcow2
cp q_data.qcow2 q_bitmap.qcow2
$Q bitmap --add q_bitmap.qcow2 b0
$Q bitmap --add -g 4096 q_bitmap.qcow2 b1
$Q convert -c -f raw -O qcow2 -o cluster_size=4096 pat.raw q_comp.qcow2
$Q convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd pat.raw q_zstd.qcow2
$Q create -q -f qcow2 -o cluster_size=16384,extended_l2=on q_ext.qcow2 256K
io -c 'write -P 3 0 3k' -c 'write -z 16k 4k' q_ext.qcow2

# vmdk: every subformat
for sf in monolithicSparse streamOptimized monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat; do
    $Q convert -f raw -O vmdk -o subformat=$sf pat.raw v_$sf.vmdk
done
$Q convert -f raw -O vmdk -o subformat=monolithicSparse,compat6=on pat.raw v_compat6.vmdk
$Q create -q -f vmdk -o zeroed_grain=on v_zg.vmdk 64K
dd if=v_monolithicSparse.vmdk bs=512 skip=1 count=1 of=v_embedded.txt 2>/dev/null

# vhd, vdi
$Q create -q -f vpc h_empty.vhd 64K
$Q create -q -f vpc -o subformat=fixed h_fixedempty.vhd 4K
$Q convert -f raw -O vpc -o subformat=dynamic pat.raw h_dyn.vhd
$Q convert -f raw -O vpc -o subformat=fixed pat.raw h_fixed.vhd
$Q create -q -f vdi d_empty.vdi 64K
$Q convert -f raw -O vdi pat.raw d_dyn.vdi
$Q convert -f raw -O vdi -o static=on pat.raw d_static.vdi

# vhdx: an empty image cut after its metadata region (BAT at 2 MiB, metadata at 3 MiB) still
# opens and is 3 MiB instead of 8 (libFuzzer caps inputs at 1 MiB unless -max_len is given)
$Q create -q -f vhdx -o log_size=1M,block_size=1M x_full.vhdx 1M
head -c 3276800 x_full.vhdx > x_empty.vhdx
$Q convert -f raw -O vhdx -o block_size=1M pat.raw x_dyn.vhdx

mkdir -p "$c"/qcow2_open "$c"/vmdk_open "$c"/vmdk_descriptor "$c"/vhd_open "$c"/vdi_open \
    "$c"/vhdx_open "$c"/probe "$c"/write_ops
cp q_*.qcow2 "$c"/qcow2_open/
cp v_*.vmdk "$c"/vmdk_open/
cp v_monolithicFlat.vmdk v_twoGbMaxExtentFlat.vmdk v_twoGbMaxExtentSparse.vmdk v_embedded.txt \
    "$c"/vmdk_descriptor/
cp h_*.vhd "$c"/vhd_open/
cp d_*.vdi "$c"/vdi_open/
cp x_empty.vhdx x_dyn.vhdx "$c"/vhdx_open/
cp q_data.qcow2 q_comp.qcow2 v_monolithicSparse.vmdk h_empty.vhd d_empty.vdi x_empty.vhdx "$c"/probe/

samples=$here/../tests/corpus/qemu-sample-images
if [ -d "$samples" ]; then
    for f in afl5.img afl9.vmdk iotest-version3.vmdk hyperv2012r2-dynamic.vhd virtualpc-dynamic.vhd \
        grub_mbr.raw empty.bochs simple-pattern.cloop simple-dmg.dmg; do
        [ -f "$samples/$f.bz2" ] && bzip2 -dc "$samples/$f.bz2" > "$f"
    done
    cp afl9.vmdk iotest-version3.vmdk "$c"/vmdk_open/ 2>/dev/null || true
    cp afl5.img hyperv2012r2-dynamic.vhd virtualpc-dynamic.vhd "$c"/vhd_open/ 2>/dev/null || true
    cp grub_mbr.raw empty.bochs simple-pattern.cloop simple-dmg.dmg "$c"/probe/ 2>/dev/null || true
fi

# write_ops: [format byte][op count][ops…][image]
python3 - "$c"/write_ops <<'PY'
import os, struct, sys
out = sys.argv[1]
ops = [(0, 0xaa, 0, 4096, 0), (2, 0, 16, 1024, 0), (3, 0, 4, 8192, 0), (0, 0x33, 3, 700, 17),
       (4, 0, 0, 65536, 0), (5, 0, 0, 65536, 0), (1, 0x44, 100, 1, 511), (7, 0, 0, 0, 0)]
head = b"".join(struct.pack("<BBIIH", *o) for o in ops)
for name in sorted(os.listdir(".")):
    sel = {"q": 0, "v": 1, "d": 2, "x": 3, "h": 4}.get(name[0]) if name[1:2] == "_" else None
    if sel is None or name.endswith(".txt") or name.startswith("x_full") or "Flat" in name:
        continue
    with open(name, "rb") as f:
        img = f.read()
    with open(os.path.join(out, "w_" + name), "wb") as f:
        f.write(bytes([sel, len(ops)]) + head + img)
PY
echo "seeded $c"
