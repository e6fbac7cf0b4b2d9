#!/bin/bash
# Runs the three standard fio diagnostics inside a test guest, three times:
#   tuned    vbd volume with vbd's flags (iothread, cache=none, num-queues=vCPUs)
#   untuned  the same vbd volume with QEMU's defaults (no iothread, host
#            page cache, one queue)
#   raw      a plain raw file opened by QEMU itself (tuned flags)
# and prints read/write IOPS, mean and p99 latency side by side, with ratios.
# Each diagnostic is --rw=randrw --rwmixread=70 --bs=4k --direct=1
# --ioengine=libaio at numjobs=1 iodepth=1, numjobs=1 iodepth=32 and
# numjobs=4 iodepth=32.
#
#   tools/fio-compare.sh [--accel kvm|tcg] [--vcpus N] [--size 256M] [--runtime 15]
#
# Under TCG (the default here, where nested KVM hangs) absolute numbers say
# little about production; the ratios between the columns are the point.
# This is a tool, not a test: it asserts nothing.
set -euo pipefail

ACCEL=tcg VCPUS=2 SIZE=256M RUNTIME=15 MEM=768M
while [ $# -gt 0 ]; do
	case "$1" in
	--accel) ACCEL=$2; shift 2 ;;
	--vcpus) VCPUS=$2; shift 2 ;;
	--size) SIZE=$2; shift 2 ;;
	--runtime) RUNTIME=$2; shift 2 ;;
	--memory) MEM=$2; shift 2 ;;
	*) echo "usage: $0 [--accel kvm|tcg] [--vcpus N] [--size 256M] [--runtime SECS] [--memory 768M]" >&2; exit 2 ;;
	esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VBD=${VBD:-$ROOT/target/release/vbd}
if [ ! -x "$VBD" ]; then
	echo "fio-compare: building vbd (release)" >&2
	(cd "$ROOT" && cargo build --release --bin vbd >&2)
fi
GUEST=$ROOT/target/test-guest
[ -f "$GUEST/initrd-fio.img" ] && [ "$GUEST/initrd-fio.img" -nt "$ROOT/tools/build-guest.sh" ] ||
	bash "$ROOT/tools/build-guest.sh" --fio "$GUEST" >&2

WORK=$(mktemp -d /tmp/vbd-fio.XXXXXX)
SERVE_PID=
cleanup() {
	[ -n "$SERVE_PID" ] && kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
	rm -rf "$WORK"
}
trap cleanup EXIT

# Both disks are files on the same filesystem, so the backend is the same.
DISK_BYTES=$(( $(numfmt --from=iec "$SIZE") + (64 << 20) ))
truncate -s "$DISK_BYTES" "$WORK/raw.img"
"$VBD" serve --unix "$WORK/nbd.sock" --threads 1 \
	--export "name=bench,backend=file,path=$WORK/vbd.img,size=$DISK_BYTES" \
	>"$WORK/serve.out" 2>"$WORK/serve.log" &
SERVE_PID=$!
for _ in $(seq 100); do [ -S "$WORK/control.sock" ] && break; sleep 0.1; done
CTL=(--control "$WORK/control.sock")

run() { # run NAME VOLUME-SPEC [--untuned]
	local name=$1 vol=$2; shift 2
	echo "fio-compare: $name: booting guest ($ACCEL, $VCPUS vCPUs)" >&2
	"$VBD" vm run "${CTL[@]}" "$name" --accel "$ACCEL" --vcpus "$VCPUS" --memory "$MEM" \
		--volume "$vol" --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initrd-fio.img" \
		--append "console=ttyS0 quiet panic=-1 vbd.mode=fio vbd.fio_size=$SIZE vbd.fio_runtime=$RUNTIME" \
		"$@" >&2
	local log=$WORK/vm/$name/serial.log
	local limit=$(( 300 + 3 * RUNTIME * 4 ))
	for _ in $(seq "$limit"); do
		grep -q VBD-FIO-DONE "$log" 2>/dev/null && break
		sleep 1
	done
	grep -q VBD-FIO-DONE "$log" || { echo "fio-compare: $name did not finish; see $log" >&2; tail -20 "$log" >&2; exit 1; }
	"$VBD" vm stop "${CTL[@]}" "$name" --grace 30 >&2
	cp "$log" "$WORK/$name.log"
}

run tuned bench:boot
run untuned bench:boot --untuned
run raw "raw:boot:raw=$WORK/raw.img"

python3 - "$WORK" <<'EOF'
import json, re, sys
work = sys.argv[1]

def results(name):
    text = open(f"{work}/{name}.log", errors="replace").read()
    out = {}
    for m in re.finditer(r"VBD-FIO-BEGIN numjobs=(\d+) iodepth=(\d+)\s*(.*?)VBD-FIO-END", text, re.S):
        body = m.group(3)
        body = body[body.index("{"):body.rindex("}") + 1]
        job = json.loads(body)["jobs"][0]
        row = {}
        for d in ("read", "write"):
            j = job[d]
            row[d + "_iops"] = j["iops"]
            row[d + "_mean_us"] = j["lat_ns"]["mean"] / 1000
            row[d + "_p99_us"] = j["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
        out[f"numjobs={m.group(1)} iodepth={m.group(2)}"] = row
    return out

runs = {n: results(n) for n in ("tuned", "untuned", "raw")}
metrics = [("read IOPS", "read_iops", True), ("write IOPS", "write_iops", True),
           ("read mean µs", "read_mean_us", False), ("read p99 µs", "read_p99_us", False),
           ("write mean µs", "write_mean_us", False), ("write p99 µs", "write_p99_us", False)]
def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"
print(f"{'diagnostic':<24} {'metric':<14} {'tuned':>10} {'untuned':>10} {'raw file':>10} {'tuned/untuned':>14} {'tuned/raw':>10}")
for diag in runs["tuned"]:
    for label, key, _ in metrics:
        t, u, r = (runs[n].get(diag, {}).get(key, 0) for n in ("tuned", "untuned", "raw"))
        print(f"{diag:<24} {label:<14} {t:>10.0f} {u:>10.0f} {r:>10.0f} {ratio(t, u):>14} {ratio(t, r):>10}")
print("IOPS ratios > 1 and latency ratios < 1 favour the tuned vbd volume.")
EOF
