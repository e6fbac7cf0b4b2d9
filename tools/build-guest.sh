#!/bin/bash
# Builds a small test guest from Debian packages: the cloud kernel and an
# initramfs with busybox-static, the virtio modules, ACPI power-button
# support and (with --fio) fio with every shared library it needs.
#
#   tools/build-guest.sh [--fio] OUTDIR
#
# Writes OUTDIR/vmlinuz and OUTDIR/initrd.img (or initrd-fio.img). The
# guest's /init reads what to do from the kernel command line:
#   vbd.mode=pattern vbd.pattern=STR  write STR-filled blocks to /dev/vda at
#       1 MiB, then to /dev/vdb once it is hot-plugged, reporting progress
#       on the serial console (VBD-...), then wait for power-off;
#   vbd.mode=fio vbd.fio_size=SIZE vbd.fio_runtime=SECS  run the three fio
#       diagnostics on /dev/vda and print their JSON between markers;
#   vbd.mode=shell  a busybox shell on the console.
# The ACPI power button (QMP system_powerdown) powers the guest off.
set -euo pipefail

FIO=0
if [ "${1:-}" = "--fio" ]; then FIO=1; shift; fi
OUT=${1:?usage: tools/build-guest.sh [--fio] OUTDIR}
mkdir -p "$OUT"

need() {
	# Installs Debian packages that are missing (needs root and apt).
	local missing=()
	for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "build-guest: installing ${missing[*]}" >&2
		apt-get install -y --no-install-recommends "${missing[@]}" >&2
	fi
}
need busybox-static linux-image-cloud-amd64 cpio gzip
[ $FIO = 1 ] && need fio

KVER=$(ls /lib/modules | grep -- '-cloud-amd64$' | sort -V | tail -1)
[ -n "$KVER" ] || { echo "build-guest: no cloud kernel modules in /lib/modules" >&2; exit 1; }
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,lib/modules,etc}
cp /bin/busybox "$ROOT/bin/busybox"
for a in sh mount umount insmod mkdir cat echo sleep dd sync poweroff ls \
	head grep sed seq printf cmp hexdump test tr awk wc rm; do
	ln -s busybox "$ROOT/bin/$a"
done

# Modules in dependency order; Debian may ship them compressed.
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk button evdev"
for m in $MODS; do
	f=$(find "/lib/modules/$KVER/kernel" -name "$m.ko*" | head -1)
	[ -n "$f" ] || { echo "build-guest: module $m not found for $KVER" >&2; exit 1; }
	case "$f" in
	*.ko.xz) xz -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -dqc "$f" >"$ROOT/lib/modules/$m.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
	*) cp "$f" "$ROOT/lib/modules/$m.ko" ;;
	esac
done
echo "$MODS" >"$ROOT/etc/modules"

if [ $FIO = 1 ]; then
	cp "$(command -v fio)" "$ROOT/bin/fio"
	# Every library fio links, at the path the loader will look for it.
	ldd "$(command -v fio)" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}' | while read -r lib; do
		mkdir -p "$ROOT$(dirname "$lib")"
		cp -L "$lib" "$ROOT$lib"
	done
	mkdir -p "$ROOT/lib64"
	[ -e "$ROOT/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/"
fi

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "VBD-ERROR insmod $m"; done

arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}";; esac; done; }

# The power button: any event from its input device powers off.
for d in /sys/class/input/event*; do
	if grep -q "Power Button" "$d/device/name" 2>/dev/null; then
		(head -c 1 "/dev/input/${d##*/}" >/dev/null && echo "VBD-POWERDOWN" && sync && poweroff -f) &
	fi
done

wait_for() { # wait_for TEST SECONDS
	i=0
	while ! eval "$1"; do
		i=$((i + 1)); [ $i -gt $(($2 * 10)) ] && return 1; sleep 0.1
	done
}

# fill DEV STR: 4 KiB of STR-lines at 1 MiB, flushed to the disk.
fill() {
	: >/tmp/blk
	while [ "$(wc -c </tmp/blk)" -lt 4096 ]; do echo "$2" >>/tmp/blk; done
	dd if=/tmp/blk of="$1" bs=4096 count=1 seek=256 conv=fsync 2>/dev/null
}

mode=$(arg vbd.mode)
echo "VBD-BOOTED mode=$mode disks=$(ls /sys/block | tr '\n' ' ')"
case "$mode" in
pattern)
	p=$(arg vbd.pattern)
	wait_for '[ -b /dev/vda ]' 30 || echo "VBD-ERROR no /dev/vda"
	fill /dev/vda "$p-vda" && echo "VBD-WROTE-VDA"
	wait_for '[ -b /dev/vdb ]' 600 || echo "VBD-ERROR no /dev/vdb"
	fill /dev/vdb "$p-vdb" && echo "VBD-WROTE-VDB"
	wait_for '[ ! -e /sys/block/vdb ]' 600 && echo "VBD-VDB-GONE"
	;;
fio)
	size=$(arg vbd.fio_size); size=${size:-256M}
	rt=$(arg vbd.fio_runtime); rt=${rt:-20}
	for cfg in "1 1" "1 32" "4 32"; do
		set -- $cfg
		echo "VBD-FIO-BEGIN numjobs=$1 iodepth=$2"
		fio --name=diag --filename=/dev/vda --rw=randrw --rwmixread=70 --bs=4k \
			--direct=1 --ioengine=libaio --numjobs=$1 --iodepth=$2 --size=$size \
			--time_based --runtime=$rt --group_reporting --output-format=json
		echo "VBD-FIO-END"
	done
	echo "VBD-FIO-DONE"
	sync; poweroff -f
	;;
shell)
	exec sh
	;;
esac
echo "VBD-IDLE"
while :; do sleep 3600; done
EOF
chmod +x "$ROOT/init"

NAME=initrd.img
[ $FIO = 1 ] && NAME=initrd-fio.img
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT/$NAME.tmp"
mv "$OUT/$NAME.tmp" "$OUT/$NAME"
echo "$OUT/vmlinuz $OUT/$NAME"
