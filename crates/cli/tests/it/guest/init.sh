#!/bin/busybox sh
# The guest's /init: load the virtio and ext4 modules, then on each test disk make a
# filesystem, write a tree of files with fsync, delete some, fstrim, print the sums,
# remount and verify them. On the crash disk, write fsync'd files until the host says
# stop (the host kills and restarts the server in between). Then power off.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo GUEST-START
depmod
for m in virtio_pci virtio_blk crc32c_generic ext4; do modprobe $m || echo "GUEST-FAIL modprobe $m"; done
FILES=${FILES:-12}

fail() { echo "GUEST-FAIL $*"; }

tree() {
    d=$1
    mkfs.ext4 -q -F /dev/$d || { fail "mkfs $d"; return; }
    mkdir -p /mnt/$d
    mount -t ext4 /dev/$d /mnt/$d || { fail "mount $d"; return; }
    for dir in a b c; do
        mkdir -p /mnt/$d/$dir
        i=0
        while [ $i -lt $FILES ]; do
            kb=$(( ( $(od -An -N2 -tu2 /dev/urandom) % 256 ) + 1 ))
            dd if=/dev/urandom of=/mnt/$d/$dir/f$i bs=1k count=$kb conv=fsync 2>/dev/null || fail "write $d $dir/f$i"
            i=$((i + 1))
        done
        # Delete every third file.
        i=0
        while [ $i -lt $FILES ]; do
            rm /mnt/$d/$dir/f$i
            i=$((i + 3))
        done
    done
    sync
    fstrim -v /mnt/$d || fail "fstrim $d"
    (cd /mnt/$d && find a b c -type f | sort | xargs sha256sum) > /tmp/sums.$d
    while read -r sum path; do echo "SUM $d /$path $sum"; done < /tmp/sums.$d
    umount /mnt/$d || fail "umount $d"
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 -o ro /dev/$d /mnt/$d || { fail "remount $d"; return; }
    (cd /mnt/$d && sha256sum -c -s /tmp/sums.$d) && echo "VERIFIED $d" || fail "sums $d"
    umount /mnt/$d
}

for d in $(echo "$TREE_DISKS" | tr , ' '); do tree $d; done

# The read-only disk: the kernel must see it read-only and refuse a write; print the
# sum of its whole content for the host to compare.
if [ -n "$RO_DISK" ]; then
    d=$RO_DISK
    [ "$(cat /sys/block/$d/ro)" = 1 ] || fail "$d is not read-only"
    if dd if=/dev/zero of=/dev/$d bs=4k count=1 oflag=direct conv=fsync 2>/tmp/ro.err; then
        fail "write to read-only $d succeeded"
    else
        echo "RO-WRITE-REFUSED $d $(head -n 1 /tmp/ro.err)"
    fi
    echo "ROSUM $d $(dd if=/dev/$d bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)"
fi

# The crash disk: fsync'd files, one after another, until /mnt/stop appears on the
# command line's count.
if [ -n "$CRASH_DISK" ]; then
    d=$CRASH_DISK
    mkfs.ext4 -q -F /dev/$d && mkdir -p /mnt/$d && mount -t ext4 /dev/$d /mnt/$d || fail "crash disk setup"
    i=0
    while [ $i -lt $CRASH_FILES ]; do
        dd if=/dev/urandom of=/mnt/$d/g$i bs=64k count=4 conv=fsync 2>/dev/null || fail "crash write g$i"
        echo "FSYNCED $d /g$i $(sha256sum /mnt/$d/g$i | cut -d' ' -f1)"
        i=$((i + 1))
    done
    umount /mnt/$d || fail "crash umount"
fi
echo GUEST-DONE
poweroff -f
