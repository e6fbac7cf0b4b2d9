#!/bin/bash
# Runs the three standard fio diagnostics inside a test guest whose disk is
# one and the same image file, reached four ways (the columns):
#   vhost    vbd serving the file over vhost-user-blk (vbd vm run's default:
#            shared memfd RAM, one queue per vCPU, queues on vbd's cores)
#   nbd      vbd serving the file over NBD with vbd's flags (iothread,
#            cache=none, num-queues=vCPUs; vbd vm run --disk-transport nbd)
#   raw      QEMU opening the file itself (virtio-blk, iothread, aio=native,
#            cache=none, num-queues=vCPUs)
#   qsd      qemu-storage-daemon's vhost-user-blk export of the file
#            (--blockdev driver=file,cache.direct=on, num-queues=vCPUs), the
#            guest started with the same QEMU flags as the vhost column's
# and, on request, `untuned` (the vbd NBD volume with QEMU's defaults).
# `--variant NAME='SERVE FLAGS'` adds a column NAME: vbd over vhost-user as
# in the vhost column, from a second vbd started with those extra `vbd
# serve` flags (e.g. --variant nopoll='--busy-poll 0') on an image of its
# own, so that a tuning is compared with the default in the same
# interleaved rounds.
# Each diagnostic is --rw=randrw --rwmixread=70 --bs=4k --direct=1
# --ioengine=libaio at numjobs x iodepth 1x1, 1x32 and 4x32. The columns
# run in interleaved rounds (round 1: every column, round 2: every column,
# ...), so that noise on a shared host hits every column alike; the report
# gives the median of the rounds, ratios against the other columns, and
# where the CPU time went during the fio runs (guest vCPU threads, QEMU's
# other threads, the storage server) per request.
#
#   tools/fio-compare.sh [--accel kvm|tcg] [--vcpus N] [--memory 768M]
#       [--size 256M] [--runtime 15] [--rounds 3] [--threads 1]
#       [--columns vhost,nbd,raw,qsd[,untuned]] [--variant NAME='FLAGS']...
#       [--out FILE.md]
#
# --threads is vbd's core count. Under TCG (the default here, where nested
# KVM hangs) absolute numbers say little about production; the ratios
# between the columns are the point. This is a tool, not a test: it
# asserts nothing.
set -euo pipefail

ACCEL=tcg VCPUS=2 SIZE=256M RUNTIME=15 MEM=768M ROUNDS=3 THREADS=1
COLUMNS=vhost,nbd,raw,qsd OUT=
VARIANTS=()
usage() {
	echo "usage: $0 [--accel kvm|tcg] [--vcpus N] [--memory 768M] [--size 256M] [--runtime SECS]" >&2
	echo "       [--rounds N] [--threads N] [--columns vhost,nbd,raw,qsd,untuned]" >&2
	echo "       [--variant NAME='SERVE FLAGS']... [--out FILE.md]" >&2
	exit 2
}
while [ $# -gt 0 ]; do
	case "$1" in
	--accel) ACCEL=$2; shift 2 ;;
	--vcpus) VCPUS=$2; shift 2 ;;
	--size) SIZE=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--memory) MEM=$2; shift 2 ;;
	--rounds) ROUNDS=$2; shift 2 ;;
	--threads) THREADS=$2; shift 2 ;;
	--columns) COLUMNS=$2; shift 2 ;;
	--variant) VARIANTS+=("$2"); shift 2 ;;
	--out) OUT=$2; shift 2 ;;
	*) usage ;;
	esac
done
IFS=, read -r -a COLS <<<"$COLUMNS"
for c in "${COLS[@]}"; do
	case "$c" in vhost | nbd | raw | qsd | untuned) ;; *) echo "unknown column $c" >&2; usage ;; esac
done
declare -A VARIANT_FLAGS=()
for v in "${VARIANTS[@]}"; do
	name=${v%%=*}
	[[ "$v" == *=* && "$name" =~ ^[a-z0-9]+$ ]] || { echo "--variant wants NAME='FLAGS' (NAME: a-z0-9), not $v" >&2; usage; }
	case "$name" in vhost | nbd | raw | qsd | untuned) echo "variant $name shadows a column" >&2; usage ;; esac
	VARIANT_FLAGS[$name]=${v#*=}
	COLS+=("$name")
done
COLUMNS=$(IFS=,; echo "${COLS[*]}")

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VBD=${VBD:-$ROOT/target/release/vbd}
if [ ! -x "$VBD" ]; then
	echo "fio-compare: building vbd (release)" >&2
	(cd "$ROOT" && cargo build --release --bin vbd >&2)
fi
QEMU=${QEMU:-qemu-system-x86_64}
QSD=${QSD:-qemu-storage-daemon}
GUEST=$ROOT/target/test-guest
[ -f "$GUEST/initrd-fio.img" ] && [ "$GUEST/initrd-fio.img" -nt "$ROOT/tools/build-guest.sh" ] ||
	bash "$ROOT/tools/build-guest.sh" --fio "$GUEST" >&2

WORK=$(mktemp -d /tmp/vbd-fio.XXXXXX)
SERVE_PIDS=() QSD_PID= QEMU_PID=
cleanup() {
	for p in $QEMU_PID $QSD_PID; do kill -KILL "$p" 2>/dev/null || true; done
	for p in "${SERVE_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
	rm -rf "$WORK"
}
trap cleanup EXIT

# One image for every column, served by vbd throughout (vbd's flock does
# not conflict with the byte-range locks QEMU and qemu-storage-daemon take
# when they open it in their turns).
DISK_BYTES=$(( $(numfmt --from=iec "$SIZE") + (64 << 20) ))
IMG=$WORK/disk.img
truncate -s "$DISK_BYTES" "$IMG"
declare -A SERVER_PID=()
start_vbd() { # start_vbd DIR IMAGE [serve flags...]: a vbd serving IMAGE, its control socket in DIR
	local dir=$1 img=$2; shift 2
	local threads=(--threads "$THREADS")
	[[ " $* " == *" --threads "* ]] && threads=()
	mkdir -p "$dir"
	"$VBD" serve --unix "$dir/nbd.sock" "${threads[@]}" "$@" \
		--export "name=bench,backend=file,path=$img,size=$DISK_BYTES" \
		>"$dir/serve.out" 2>"$dir/serve.log" &
	SERVER_PID[$dir]=$!
	SERVE_PIDS+=($!)
	for _ in $(seq 100); do [ -S "$dir/control.sock" ] && break; sleep 0.1; done
	[ -S "$dir/control.sock" ] || { echo "fio-compare: vbd in $dir did not start; see $dir/serve.log" >&2; exit 1; }
}
start_vbd "$WORK" "$IMG"
# A file export is locked by the vbd serving it, so each variant's vbd has
# an image of its own, made the same way on the same filesystem.
for name in "${!VARIANT_FLAGS[@]}"; do
	truncate -s "$DISK_BYTES" "$WORK/disk-$name.img"
	# shellcheck disable=SC2086 # the flags are words on purpose
	start_vbd "$WORK/v-$name" "$WORK/disk-$name.img" ${VARIANT_FLAGS[$name]}
done
APPEND="console=ttyS0 quiet panic=-1 vbd.mode=fio vbd.fio_size=$SIZE vbd.fio_runtime=$RUNTIME"
MEM_MIB=$(( $(numfmt --from=iec "$MEM") >> 20 ))

# Waits for the guest's fio runs (VBD-FIO-DONE on its serial log) while
# sampling, twice a second, the CPU seconds of QEMU's threads (vCPU threads
# are named "CPU n/TCG" or "CPU n/KVM" with debug-threads=on; the rest are
# its main loop, iothreads and vhost-user client) and of the storage
# server's: from the first VBD-FIO-BEGIN to the last sample before DONE
# (the guest powers off right after). One line per run in cpu.txt.
watch_fio() { # watch_fio NAME QEMU-PID SERVER-PID LOG
	local limit=$(( 300 + 3 * RUNTIME * 4 ))
	python3 - "$@" "$limit" "$WORK/cpu.txt" <<'EOF'
import os, sys, time
name, qpid, spid, log, limit, out = sys.argv[1:7]
hz = os.sysconf("SC_CLK_TCK")

def cpu(pid):
    vcpu = other = 0.0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{t}/stat").read()
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        s = (int(f[11]) + int(f[12])) / hz
        if comm.startswith("CPU "):
            vcpu += s
        else:
            other += s
    return [vcpu, other]

def text():
    try:
        return open(log, errors="replace").read()
    except OSError:
        return ""

begin = last = None
deadline = time.time() + int(limit)
while time.time() < deadline:
    t = text()
    try:
        sample = cpu(qpid) + cpu(spid)
    except OSError:
        sample = None
    if begin is None and "VBD-FIO-BEGIN" in t and sample:
        begin = sample
    if begin is not None and sample:
        last = sample
    if "VBD-FIO-DONE" in t:
        with open(out, "a") as f:
            f.write(" ".join([name] + [f"{v:.2f}" for v in begin + last]) + "\n")
        sys.exit(0)
    time.sleep(0.5)
sys.exit(f"fio-compare: {name} did not finish; see {log}\n" + text()[-2000:])
EOF
}

run_vbd() { # run_vbd SERVER-DIR NAME VOLUME-SPEC [vm run flags...]
	local dir=$1 name=$2 vol=$3; shift 3
	local ctl=(--control "$dir/control.sock")
	echo "fio-compare: $name: booting guest ($ACCEL, $VCPUS vCPUs)" >&2
	"$VBD" vm run "${ctl[@]}" "$name" --accel "$ACCEL" --vcpus "$VCPUS" --memory "$MEM" \
		--volume "$vol" --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initrd-fio.img" \
		--append "$APPEND" "$@" >&2
	local pid
	pid=$("$VBD" vm list "${ctl[@]}" --json |
		python3 -c "import json,sys; print(next(v['pid'] for v in json.load(sys.stdin) if v['name']=='$name'))")
	watch_fio "$name" "$pid" "${SERVER_PID[$dir]}" "$dir/vm/$name/serial.log"
	"$VBD" vm stop "${ctl[@]}" "$name" --grace 30 >&2
	cp "$dir/vm/$name/serial.log" "$WORK/$name.log"
}

# qemu-storage-daemon's export, and a QEMU with the flags vbd gives a
# vhost-user VM (see vm::config::argv): shared memfd RAM, the disk on a
# reconnecting socket chardev, one queue per vCPU.
run_qsd() { # run_qsd NAME
	local name=$1 sock=$WORK/qsd.sock log=$WORK/$1.log
	echo "fio-compare: $name: qemu-storage-daemon + guest ($ACCEL, $VCPUS vCPUs)" >&2
	rm -f "$sock"
	"$QSD" --blockdev "driver=file,node-name=f0,filename=$IMG,cache.direct=on" \
		--export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$VCPUS" \
		2>"$WORK/qsd.log" &
	QSD_PID=$!
	for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
	local accel=tcg,thread=multi cpu=max
	[ "$ACCEL" = kvm ] && accel=kvm cpu=host
	"$QEMU" -no-user-config -nodefaults -name "guest=$name,debug-threads=on" \
		-machine q35,memory-backend=mem -accel "$accel" -cpu "$cpu" -smp "$VCPUS" -m "${MEM_MIB}M" \
		-object "memory-backend-memfd,id=mem,size=${MEM_MIB}M,share=on" -display none \
		-chardev "file,id=serial0,path=$log" -serial chardev:serial0 \
		-kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd-fio.img" -append "$APPEND" \
		-chardev "socket,id=chr-bench,path=$sock,reconnect=1" \
		-device "vhost-user-blk-pci,id=disk-bench,chardev=chr-bench,num-queues=$VCPUS,bootindex=1" \
		2>"$WORK/$name.qemu.log" &
	QEMU_PID=$!
	watch_fio "$name" "$QEMU_PID" "$QSD_PID" "$log"
	# The guest powers off after its last diagnostic.
	for _ in $(seq 30); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 1; done
	kill -KILL "$QEMU_PID" 2>/dev/null || true
	wait "$QEMU_PID" 2>/dev/null || true
	kill -TERM "$QSD_PID"
	wait "$QSD_PID" 2>/dev/null || true
	QEMU_PID= QSD_PID=
}

for round in $(seq "$ROUNDS"); do
	for c in "${COLS[@]}"; do
		name=$c-$round
		case "$c" in
		vhost) run_vbd "$WORK" "$name" bench:boot --disk-transport vhost-user ;;
		nbd) run_vbd "$WORK" "$name" bench:boot --disk-transport nbd ;;
		untuned) run_vbd "$WORK" "$name" bench:boot --disk-transport nbd --untuned ;;
		# A plain VM (no shared memfd RAM): QEMU on the file, as before vhost-user.
		raw) run_vbd "$WORK" "$name" "raw:boot:raw=$IMG" --disk-transport nbd ;;
		qsd) run_qsd "$name" ;;
		*) run_vbd "$WORK/v-$c" "$name" bench:boot --disk-transport vhost-user ;;
		esac
	done
done

REPORT=$WORK/report.md
python3 - "$WORK" "$ROUNDS" "$COLUMNS" >"$REPORT" <<'EOF'
import json, re, statistics, sys
work, rounds, columns = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
TITLE = {"vhost": "vbd vhost-user", "nbd": "vbd NBD", "raw": "raw file",
         "qsd": "qsd vhost-user", "untuned": "vbd NBD untuned"}
variants = [c for c in columns if c not in TITLE]
for v in variants:
    TITLE[v] = f"vbd vhost-user {v}"

def results(name):
    text = open(f"{work}/{name}.log", errors="replace").read()
    out = {}
    for m in re.finditer(r"VBD-FIO-BEGIN numjobs=(\d+) iodepth=(\d+)\s*(.*?)VBD-FIO-END", text, re.S):
        body = m.group(3)
        job = json.loads(body[body.index("{"):body.rindex("}") + 1])["jobs"][0]
        row = {"ios": job["read"]["total_ios"] + job["write"]["total_ios"]}
        for d in ("read", "write"):
            j = job[d]
            row[d + "_iops"] = j["iops"]
            row[d + "_p99_us"] = j["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
        out[f"{m.group(1)}x{m.group(2)}"] = row
    return out

runs = {c: [results(f"{c}-{r}") for r in range(1, rounds + 1)] for c in columns}
diags = ["1x1", "1x32", "4x32"]

def med(c, d, key):
    v = [r[d][key] for r in runs[c] if d in r]
    return statistics.median(v) if v else 0.0

def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"

print(f"Medians of {rounds} interleaved round(s); IOPS are read + write of the 70/30 mix.\n")
print("| diagnostic | metric | " + " | ".join(TITLE[c] for c in columns) + " |")
print("|---|---|" + "---:|" * len(columns))
for d in diags:
    for label, key in [("read IOPS", "read_iops"), ("write IOPS", "write_iops"),
                       ("read p99 µs", "read_p99_us"), ("write p99 µs", "write_p99_us")]:
        print(f"| {d} | {label} | " + " | ".join(f"{med(c, d, key):.0f}" for c in columns) + " |")
    print(f"| {d} | **total IOPS** | " + " | ".join(
        f"**{med(c, d, 'read_iops') + med(c, d, 'write_iops'):.0f}**" for c in columns) + " |")

pairs = [(a, b) for a, b in [("vhost", "raw"), ("vhost", "qsd"), ("vhost", "nbd"),
                             ("qsd", "raw"), ("nbd", "raw"), ("nbd", "untuned")]
         + [(v, o) for v in variants for o in ("vhost", "qsd", "raw")]
         if a in columns and b in columns]
if pairs:
    print("\nRatios of the median total IOPS (read + write); p99 ratios below 1 favour the first.\n")
    print("| diagnostic | " + " | ".join(f"{TITLE[a]} / {TITLE[b]}" for a, b in pairs) + " |")
    print("|---|" + "---:|" * len(pairs))
    tot = lambda c, d: med(c, d, "read_iops") + med(c, d, "write_iops")
    for d in diags:
        print(f"| {d} IOPS | " + " | ".join(ratio(tot(a, d), tot(b, d)) for a, b in pairs) + " |")
        print(f"| {d} read p99 | " + " | ".join(
            ratio(med(a, d, "read_p99_us"), med(b, d, "read_p99_us")) for a, b in pairs) + " |")

# CPU during the fio runs (all three diagnostics), per request.
cpu = {}
for line in open(f"{work}/cpu.txt"):
    f = line.split()
    name, b, e = f[0], list(map(float, f[1:5])), list(map(float, f[5:9]))
    d = [y - x for x, y in zip(b, e)]
    col = name.rsplit("-", 1)[0]
    ios = sum(r["ios"] for r in results(name).values()) or 1
    cpu.setdefault(col, []).append([v * 1e6 / ios for v in (d[0], d[1], d[2] + d[3])])
print("\nCPU per request during the fio runs (µs, median of the rounds): the guest's vCPU threads, "
      "QEMU's other threads (main loop, iothreads, vhost-user client), and the storage server "
      "(vbd for the vbd columns, qemu-storage-daemon for qsd; raw has none).\n")
print("| column | guest vCPUs | QEMU other | server |")
print("|---|---:|---:|---:|")
for c in columns:
    rows = cpu.get(c, [])
    m = [statistics.median(x[i] for x in rows) if rows else 0 for i in range(3)]
    server = "-" if c == "raw" else f"{m[2]:.1f}"
    print(f"| {TITLE[c]} | {m[0]:.1f} | {m[1]:.1f} | {server} |")
EOF
if [ ${#VARIANT_FLAGS[@]} -gt 0 ]; then
	echo >>"$REPORT"
	echo "Columns vbd vhost-user NAME: a second vbd (--threads $THREADS unless given) with these extra \`vbd serve\` flags:" >>"$REPORT"
	for name in "${!VARIANT_FLAGS[@]}"; do echo "- $name: \`${VARIANT_FLAGS[$name]}\`" >>"$REPORT"; done
fi
cat "$REPORT"
[ -n "$OUT" ] && cp "$REPORT" "$OUT"
exit 0
