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
# extended L2 with a bitmap and a snapshot; metadata preallocation (qcow2_rw reaches them)
$Q create -q -f qcow2 -o cluster_size=16384,extended_l2=on q_extbm.qcow2 256K
$Q bitmap --add q_extbm.qcow2 b0
io -c 'write -P 7 4k 2k' q_extbm.qcow2
$Q snapshot -c s1 q_extbm.qcow2
io -c 'write -P 8 5k 1k' q_extbm.qcow2
$Q create -q -f qcow2 -o cluster_size=512,preallocation=metadata q_prealloc.qcow2 64K
cp q_bitmap.qcow2 q_bitmap_snap.qcow2
$Q snapshot -c s1 q_bitmap_snap.qcow2
$Q bitmap --add --disable q_bitmap_snap.qcow2 b2
# luks (luks_open): the smallest header (AES-128, short iteration time)
$Q create -q -f luks --object secret,id=s0,data=x -o key-secret=s0,iter-time=10,cipher-alg=aes-128 \
    l_aes128.luks 64K

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

mkdir -p "$c"/qcow2_open "$c"/qcow2_rw "$c"/json_backing "$c"/nbd_stream "$c"/luks_open \
    "$c"/vmdk_open "$c"/vmdk_descriptor "$c"/vhd_open "$c"/vdi_open \
    "$c"/vhdx_open "$c"/probe "$c"/write_ops
cp q_*.qcow2 "$c"/qcow2_open/
cp v_*.vmdk "$c"/vmdk_open/
cp l_*.luks "$c"/luks_open/
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

# qcow2_rw: [flags][op count][ops…][image], a few flag sets per image
python3 - "$c"/qcow2_rw <<'PY'
import os, struct, sys
out = sys.argv[1]
ops = [(0, 0xaa, 0, 4096, 0), (3, 0, 4, 8192, 0), (0, 0x33, 3, 700, 17), (4, 0, 0, 65536, 0),
       (5, 0, 0, 65536, 0), (7, 0, 0, 0, 0)]
head = bytes([len(ops)]) + b"".join(struct.pack("<BBIIH", *o) for o in ops)
flag_sets = [0x00, 0x08, 0x0c, 0x10, 0x22, 0x01, 0x41, 0xc9]
names = sorted(n for n in os.listdir(".") if n.startswith("q_") and n.endswith(".qcow2"))
for i, name in enumerate(names):
    with open(name, "rb") as f:
        img = f.read()
    for flags in (flag_sets[i % len(flag_sets)], flag_sets[(i + 3) % len(flag_sets)]):
        with open(os.path.join(out, "r%02x_%s" % (flags, name)), "wb") as f:
            f.write(bytes([flags]) + head + img)
PY

# json_backing: the text after "json:" (the scratch directory holds base.raw, base.qcow2)
j=$c/json_backing
printf '%s' '{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}' > "$j"/file
printf '%s' '{"driver":"raw","file":{"driver":"raw","offset":512,"size":4096,"file":{"driver":"file","filename":"base.raw"}}}' > "$j"/window
printf '%s' "{'driver': 'qcow2', 'file': {'driver': 'raw', 'offset': 0, 'size': '64k', 'file': 'base.qcow2'}}" > "$j"/quoted
printf '%s' '{"driver":"qcow2","file":"top.qcow2"}' > "$j"/loop
printf '%s' '{"file":{"driver":"raw","size":"60k","file":{"driver":"raw","offset":"1k","file":{"filename":"base.raw"}}}}' > "$j"/nested
printf '%s' '{"driver":"vmdk","file":{"filename":"base.raw"},"x":[1,true,null,{"y":"z"}]}' > "$j"/vmdk

# nbd_stream: [mode][client stream]
python3 - "$c"/nbd_stream <<'PY'
import os, struct, sys
out = sys.argv[1]
def req(ty, off, ln, flags=0, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, ty, 7, off, ln) + payload
tx = (req(0, 0, 4096) + req(1, 4096, 512, 1, b"\xab" * 512) + req(6, 8192, 4096, 2)
      + req(4, 0, 4096) + req(7, 0, 1 << 20) + req(7, 0, 65536, 8) + req(3, 0, 0)
      + req(5, 0, 4096) + req(0, (1 << 20) - 512, 1024) + req(2, 0, 0))
for mode in (0x01, 0x07, 0x0f, 0x1f, 0x2f, 0x67):
    with open(os.path.join(out, "tx%02x" % mode), "wb") as f:
        f.write(bytes([mode]) + tx)
def opt(o, data=b""):
    return b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data
name = struct.pack(">I", 0)
meta = name + struct.pack(">I", 1) + struct.pack(">I", 15) + b"base:allocation"
neg = (struct.pack(">I", 3) + opt(3) + opt(8) + opt(9, meta) + opt(10, meta)
       + opt(6, name + struct.pack(">HH", 1, 3)) + opt(7, name + struct.pack(">H", 0)))
for mode in (0x00, 0x08, 0x10):
    with open(os.path.join(out, "neg%02x" % mode), "wb") as f:
        f.write(bytes([mode]) + neg + tx)
with open(os.path.join(out, "oldname"), "wb") as f:
    f.write(bytes([0]) + struct.pack(">I", 1) + opt(1, b"") + tx)
PY
echo "seeded $c"
