#!/bin/bash
# Builds a small test guest from Debian packages: the cloud kernel and an
# initramfs with busybox-static, the virtio modules, ACPI power-button
# support, (with --fio) fio with every shared library it needs and (with
# --nbd-client) the kernel's NBD client: nbd.ko, /sbin/nbd-client with its
# libraries, and the virtio-net modules to reach the host over QEMU's user
# network.
#
#   tools/build-guest.sh [--fio] [--nbd-client] OUTDIR
#
# Writes OUTDIR/vmlinuz and OUTDIR/initrd.img (initrd-fio.img with --fio,
# initrd-nbd.img with --nbd-client, initrd-fio-nbd.img with both). The
# guest's /init reads what to do from the kernel command line:
#   vbd.mode=pattern vbd.pattern=STR  write STR-filled blocks to /dev/vda at
#       1 MiB, then to /dev/vdb once it is hot-plugged, reporting progress
#       on the serial console (VBD-...), then wait for power-off;
#   vbd.mode=fio vbd.fio_size=SIZE vbd.fio_runtime=SECS  run the three fio
#       diagnostics on /dev/vda and print their JSON between markers;
#   vbd.mode=fio-verify vbd.fio_runs=N vbd.fio_size=SIZE vbd.fio_runtime=SECS
#       vbd.pattern=STR  (needs --fio) N runs of random 4 KiB writes on
#       /dev/vda, each block read back and checked against its crc32c while
#       the run goes on (verify_backlog), each run's JSON between
#       VBD-FIOV-BEGIN i and VBD-FIOV-END i rc=CODE; then what pattern mode
#       does with /dev/vdb (fill it once hot-plugged, report when it goes),
#       and once it is plugged in again, read it back (VBD-VDB-BACK-OK);
#   vbd.mode=nbd-client vbd.nbd_port=PORT [vbd.nbd_host=10.0.2.2]
#       [vbd.nbd_export=NAME vbd.nbd_size=BYTES vbd.pattern=STR]
#       [vbd.nbd_ro_export=NAME vbd.nbd_ro_pattern=STR]  bring up eth0
#       (10.0.2.15/24, no default route), load nbd.ko and run nbd-client:
#       on NAME, write STR-patterns at several offsets (direct and buffered,
#       fsynced), discard 1 MiB, read it all back, disconnect, reconnect and
#       read it again; on the read-only export, read the STR-pattern the
#       host put at 0 and check that writing fails. Reports VBD-NBD-... lines
#       (VBD-NBD-OK when all is done) and powers off;
#   vbd.mode=shell  a busybox shell on the console.
# The ACPI power button (QMP system_powerdown) powers the guest off.
set -euo pipefail

FIO=0
NBD=0
while :; do
	case "${1:-}" in
	--fio) FIO=1; shift ;;
	--nbd-client) NBD=1; shift ;;
	*) break ;;
	esac
done
OUT=${1:?usage: tools/build-guest.sh [--fio] [--nbd-client] OUTDIR}
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
[ $NBD = 1 ] && need nbd-client

KVER=$(ls /lib/modules | grep -- '-cloud-amd64$' | sort -V | tail -1)
[ -n "$KVER" ] || { echo "build-guest: no cloud kernel modules in /lib/modules" >&2; exit 1; }
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,lib/modules,etc}
cp /bin/busybox "$ROOT/bin/busybox"
for a in sh mount umount insmod mkdir cat echo sleep dd sync poweroff ls \
	head grep sed seq printf cmp hexdump test tr awk wc rm cp mv ip blkdiscard \
	blockdev; do
	ln -s busybox "$ROOT/bin/$a"
done

# Modules in dependency order (`modinfo -F depends` against $KVER's
# modules: virtio_net needs net_failover, which needs failover); Debian may
# ship them compressed. /init loads those in /etc/modules at boot; nbd.ko is
# loaded by the nbd-client mode itself.
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk button evdev"
[ $NBD = 1 ] && MODS="$MODS failover net_failover virtio_net"
module() { # module NAME: copy NAME.ko, uncompressed, into the initramfs
	local f
	f=$(find "/lib/modules/$KVER/kernel" -name "$1.ko*" | head -1)
	[ -n "$f" ] || { echo "build-guest: module $1 not found for $KVER" >&2; exit 1; }
	case "$f" in
	*.ko.xz) xz -dc "$f" >"$ROOT/lib/modules/$1.ko" ;;
	*.ko.zst) zstd -dqc "$f" >"$ROOT/lib/modules/$1.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$ROOT/lib/modules/$1.ko" ;;
	*) cp "$f" "$ROOT/lib/modules/$1.ko" ;;
	esac
}
for m in $MODS; do module "$m"; done
echo "$MODS" >"$ROOT/etc/modules"

program() { # program PATH: copy a dynamically linked binary and every library it links
	cp "$1" "$ROOT/bin/$(basename "$1")"
	# Each library at the path the loader will look for it.
	ldd "$1" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}' | while read -r lib; do
		mkdir -p "$ROOT$(dirname "$lib")"
		cp -L "$lib" "$ROOT$lib"
	done
	mkdir -p "$ROOT/lib64"
	[ -e "$ROOT/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/"
}
[ $FIO = 1 ] && program "$(command -v fio)"
if [ $NBD = 1 ]; then
	module nbd
	program /sbin/nbd-client
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

# blk STR LEN FILE: STR-lines cut at 4 KiB (what fill writes), repeated or
# cut to LEN bytes (below 4 KiB, or 4 KiB times a power of two). Built by
# doubling: a loop per line is slow under TCG.
blk() {
	echo "$1" >"$3"
	while [ "$(wc -c <"$3")" -lt 4096 ]; do cat "$3" "$3" >"$3.x" && mv "$3.x" "$3"; done
	head -c 4096 "$3" >"$3.x" && mv "$3.x" "$3"
	while [ "$(wc -c <"$3")" -lt "$2" ]; do cat "$3" "$3" >"$3.x" && mv "$3.x" "$3"; done
	head -c "$2" "$3" >"$3.x" && mv "$3.x" "$3"
}

# The kernel NBD client against the host's vbd (see the header of
# tools/build-guest.sh). Every check that fails prints VBD-ERROR.
nbd_host=10.0.2.2
nbd_port=10809
nbd_fail() { echo "VBD-ERROR $*"; return 1; }
nbd_up() { # nbd_up DEV EXPORT [nbd-client options]: connect, wait for the size
	dev=$1 name=$2; shift 2
	nbd-client -N "$name" "$nbd_host" "$nbd_port" "$dev" "$@" 2>&1 ||
		nbd_fail "nbd-client -N $name $nbd_host $nbd_port $dev $* failed" || return 1
	wait_for "[ \"\$(cat /sys/block/${dev#/dev/}/size)\" != 0 ]" 10 || nbd_fail "$dev has no size"
}
nbd_down() { # nbd_down DEV: disconnect, wait until the kernel let go
	nbd-client -d "$1" 2>&1 || nbd_fail "nbd-client -d $1 failed" || return 1
	wait_for "[ \"\$(cat /sys/block/${1#/dev/}/size)\" = 0 ]" 10 || nbd_fail "$1 still connected"
}
# The regions written on the read-write export: OFFSET LENGTH HOW, where HOW
# is direct (O_DIRECT) or fsync (page cache, then fsync: the client sends a
# FLUSH). The buffered write at 1 MiB + 512 is not page-aligned, so the
# kernel reads the pages around it from the server first. The 2 MiB at
# 16 MiB has its middle MiB discarded afterwards.
nbd_regions() {
	echo "0 4096 direct"
	echo "1049088 4096 fsync"
	echo "8388608 1048576 direct"
	echo "16777216 2097152 fsync"
	echo "$(($1 - 4096)) 4096 fsync"
}
nbd_discard_at=17301504
nbd_discard_len=1048576
nbd_write() { # nbd_write DEV STR SIZE: write the regions, keeping each in /tmp/wOFFSET
	nbd_regions "$3" | while read -r off len how; do
		blk "$2-$off" "$len" /tmp/w$off
		case $how in
		direct) dd if=/tmp/w$off of="$1" bs="$len" count=1 seek="$off" oflag=seek_bytes,direct 2>/dev/null ;;
		fsync) dd if=/tmp/w$off of="$1" bs="$len" count=1 seek="$off" oflag=seek_bytes conv=fsync 2>/dev/null ;;
		esac || nbd_fail "writing $len bytes at $off ($how)" || return 1
	done
}
nbd_check() { # nbd_check DEV SIZE: every region reads back, the discarded MiB as zeros
	nbd_regions "$2" | while read -r off len how; do
		cp /tmp/w$off /tmp/w
		if [ "$off" = 16777216 ]; then
			head -c $((nbd_discard_at - off)) /tmp/w$off >/tmp/w
			head -c $nbd_discard_len /dev/zero >>/tmp/w
			tail -c $((off + len - nbd_discard_at - nbd_discard_len)) /tmp/w$off >>/tmp/w
		fi
		dd if="$1" of=/tmp/r bs="$len" count=1 skip="$off" iflag=skip_bytes,fullblock 2>/dev/null ||
			nbd_fail "reading $len bytes at $off" || return 1
		cmp /tmp/w /tmp/r || { hexdump -C /tmp/r | head -5; nbd_fail "data at $off differs"; } || return 1
	done
}
nbd_rw() { # nbd_rw EXPORT STR SIZE
	nbd_up /dev/nbd0 "$1" || return 1
	got=$(blockdev --getsize64 /dev/nbd0)
	[ "$got" = "$3" ] || nbd_fail "/dev/nbd0 has $got bytes, not $3" || return 1
	q=/sys/block/nbd0/queue
	echo "VBD-NBD-CONNECTED size=$got ro=$(blockdev --getro /dev/nbd0) bs=$(cat $q/logical_block_size)" \
		"write_cache=$(tr ' ' _ <$q/write_cache) discard_max=$(cat $q/discard_max_bytes)"
	nbd_write /dev/nbd0 "$2" "$3" || return 1
	echo "VBD-NBD-WROTE"
	blkdiscard -o $nbd_discard_at -l $nbd_discard_len /dev/nbd0 || nbd_fail "blkdiscard" || return 1
	echo "VBD-NBD-DISCARDED"
	# Written back and dropped from the page cache: the reads go to the server.
	{ blockdev --flushbufs /dev/nbd0 && echo 3 >/proc/sys/vm/drop_caches; } ||
		nbd_fail "dropping the page cache" || return 1
	nbd_check /dev/nbd0 "$3" || return 1
	echo "VBD-NBD-READBACK"
	nbd_down /dev/nbd0 || return 1
	echo "VBD-NBD-DISCONNECTED"
	# A new connection, with nothing cached, sees the same data.
	nbd_up /dev/nbd0 "$1" || return 1
	nbd_check /dev/nbd0 "$3" || return 1
	nbd_down /dev/nbd0 || return 1
	echo "VBD-NBD-RECONNECT-READBACK"
}
nbd_ro() { # nbd_ro EXPORT STR: the host's pattern at 0 reads back, writes fail
	nbd_up /dev/nbd1 "$1" || return 1
	echo "VBD-NBD-RO-CONNECTED ro=$(blockdev --getro /dev/nbd1)"
	blk "$2" 65536 /tmp/w
	dd if=/dev/nbd1 of=/tmp/r bs=65536 count=1 iflag=direct,fullblock 2>/dev/null ||
		nbd_fail "reading the read-only export" || return 1
	cmp /tmp/w /tmp/r || { hexdump -C /tmp/r | head -5; nbd_fail "read-only export data differs"; } || return 1
	echo "VBD-NBD-RO-READ"
	if err=$(dd if=/tmp/w of=/dev/nbd1 bs=4096 count=1 oflag=direct 2>&1); then
		nbd_fail "writing to the read-only export succeeded"
		return 1
	fi
	echo "VBD-NBD-RO-WRITE-FAILED $(echo "$err" | head -1)"
	nbd_down /dev/nbd1 || return 1
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
fio-verify)
	size=$(arg vbd.fio_size); size=${size:-64M}
	rt=$(arg vbd.fio_runtime); rt=${rt:-20}
	runs=$(arg vbd.fio_runs); runs=${runs:-1}
	p=$(arg vbd.pattern)
	wait_for '[ -b /dev/vda ]' 30 || echo "VBD-ERROR no /dev/vda"
	for i in $(seq "$runs"); do
		echo "VBD-FIOV-BEGIN $i"
		fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --direct=1 \
			--ioengine=libaio --iodepth=16 --size="$size" --time_based --runtime="$rt" \
			--verify=crc32c --verify_backlog=64 --verify_fatal=1 \
			--eta=never --output-format=json --output=/tmp/fio.json 2>/tmp/fio.err
		rc=$?
		cat /tmp/fio.json
		sed 's/^/VBD-FIOV-STDERR /' /tmp/fio.err
		echo "VBD-FIOV-END $i rc=$rc"
	done
	wait_for '[ -b /dev/vdb ]' 600 || echo "VBD-ERROR no /dev/vdb"
	fill /dev/vdb "$p-vdb" && echo "VBD-WROTE-VDB"
	wait_for '[ ! -e /sys/block/vdb ]' 600 && echo "VBD-VDB-GONE"
	# Attached again (a disk with a size: the old node may linger a moment
	# after the unplug): what fill wrote reads back.
	wait_for '[ "$(cat /sys/block/vdb/size 2>/dev/null || echo 0)" -gt 0 ] && [ -b /dev/vdb ]' 600 ||
		echo "VBD-ERROR no /dev/vdb again"
	head -c 4096 /tmp/blk >/tmp/want # fill wrote the first 4 KiB of it
	if dd if=/dev/vdb of=/tmp/back bs=4096 count=1 skip=256 iflag=direct && cmp /tmp/want /tmp/back; then
		echo "VBD-VDB-BACK-OK"
	else
		echo "VBD-ERROR /dev/vdb reads back wrong"
	fi
	;;
nbd-client)
	v=$(arg vbd.nbd_host); [ -n "$v" ] && nbd_host=$v
	v=$(arg vbd.nbd_port); [ -n "$v" ] && nbd_port=$v
	rw=$(arg vbd.nbd_export)
	ro=$(arg vbd.nbd_ro_export)
	if ip link set lo up && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0; then
		echo "VBD-NBD-NET $(ip -o -4 addr show dev eth0 | awk '{print $4}')"
	else
		echo "VBD-ERROR no network: $(ls /sys/class/net | tr '\n' ' ')"
	fi
	insmod /lib/modules/nbd.ko || echo "VBD-ERROR insmod nbd"
	ok=1
	if [ -n "$rw" ]; then nbd_rw "$rw" "$(arg vbd.pattern)" "$(arg vbd.nbd_size)" || ok=0; fi
	if [ -n "$ro" ]; then nbd_ro "$ro" "$(arg vbd.nbd_ro_pattern)" || ok=0; fi
	[ $ok = 1 ] && echo "VBD-NBD-OK"
	echo "VBD-NBD-DONE"
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

NAME=initrd
[ $FIO = 1 ] && NAME=$NAME-fio
[ $NBD = 1 ] && NAME=$NAME-nbd
NAME=$NAME.img
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT/$NAME.tmp"
mv "$OUT/$NAME.tmp" "$OUT/$NAME"
echo "$OUT/vmlinuz $OUT/$NAME"
