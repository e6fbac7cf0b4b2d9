#!/usr/bin/env bash
# Shrinks the corpus of a line-based target (qmp_reply: each line is parsed
# on its own) to tens of files without losing an edge: an edges-only merge,
# then the survivors concatenated into files of up to 4 KiB, then a merge
# that keeps on their own only the inputs that still add an edge (mostly
# ones that end without a newline). Run from fuzz/ after `cargo fuzz run`
# or `cargo fuzz cmin` has built the target. Usage: pack-lines.sh [TARGET [DIR]].
set -euo pipefail
target=${1:-qmp_reply}
bin=target/x86_64-unknown-linux-gnu/release/$target
corpus=${2:-corpus/$target}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/edges" "$work/out" "$work/check"
"$bin" -merge=1 -use_counters=0 "$work/edges" "$corpus" 2>&1 | grep MERGE-OUTER | tail -1
pack=$work/pack
: >"$pack"
flush() {
    if [ -s "$pack" ]; then
        mv "$pack" "$work/out/$(sha1sum "$pack" | cut -c1-40)"
    fi
    : >"$pack"
}
# Smallest first, so the packs fill evenly.
for f in $(ls -Sr "$work/edges"); do
    f=$work/edges/$f
    len=$(($(stat -c %s "$f") + 1))
    if [ $(($(stat -c %s "$pack") + len)) -gt 4096 ]; then
        flush
    fi
    cat "$f" >>"$pack"
    [ "$(tail -c 1 "$f" | od -An -tx1 | tr -d ' ')" = 0a ] || echo >>"$pack"
done
flush
"$bin" -merge=1 -use_counters=0 "$work/out" "$work/edges" 2>/dev/null
rm -rf "$corpus"
mkdir "$corpus"
cp "$work/out/"* "$corpus/"
"$bin" -merge=1 -use_counters=0 "$work/check" "$corpus" 2>&1 | grep MERGE-OUTER | tail -1
ls "$corpus" | wc -l
