#!/usr/bin/env bash
# bench.sh: kiln's benchmarks, each beside its peers in the same run, printing ratios.
# Peers that are not installed are skipped with a note (bazel-remote is not packaged
# in Debian: build it from source yourself and point BAZEL_REMOTE at the binary).
#
#   scripts/bench.sh [cas|sandbox|exec]...   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-$PWD/bin/kiln}
work=$(mktemp -d /tmp/kiln-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# wait_port waits until something listens on 127.0.0.1:$1.
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "bench: nothing listening on $1" >&2; return 1; }

parts=${*:-cas sandbox exec}
want() { [[ " $parts " == *" $1 "* ]]; }

if want cas; then
echo "== CAS (ByteStream 1 MiB x 8 streams, BatchUpdate 4 KiB, FindMissing) =="
go build -o "$work/casbench" ./test/bench/casbench
"$KILN" serve --data "$work/kiln" --listen 127.0.0.1:18801 --http-listen "" --log-level warn &
pids+=($!)
wait_port 18801
servers=(--server kiln=127.0.0.1:18801)
if [ -n "${BAZEL_REMOTE:-}" ] && [ -x "$BAZEL_REMOTE" ]; then
  "$BAZEL_REMOTE" --dir "$work/br" --max_size 20 --storage_mode uncompressed --grpc_address 127.0.0.1:18802 --http_address 127.0.0.1:18803 >/dev/null 2>&1 &
  pids+=($!)
  wait_port 18802
  servers+=(--server bazel-remote=127.0.0.1:18802)
else
  echo "bazel-remote: skipped (set BAZEL_REMOTE=/path/to/bazel-remote for a side-by-side run)"
fi
# Both servers are measured in the same run, row by row, over CAS_ROUNDS rounds (default
# 3): on a shared machine the load changes between rows, and only interleaved
# measurements compare.
"$work/casbench" "${servers[@]}" --rounds "${CAS_ROUNDS:-3}" | tee "$work/cas.txt"
# The other physical limit of a disk store: how fast this filesystem takes writes.
dd if=/dev/zero of="$work/dd.out" bs=1M count=512 conv=fsync 2>&1 | awk '/copied/ { print "filesystem write ceiling (dd 512 MiB, fsync): " $(NF-1) " " $NF }'
rm -f "$work/dd.out"
fi

for part in sandbox exec; do
  if want "$part" && [ -x "scripts/bench-$part.sh" ]; then echo; "scripts/bench-$part.sh" | tee "$work/$part.txt"; fi
done

# The ratios of issue 15's goals, gathered from the parts above (each measured against
# its peer in the same run).
echo
echo "== summary: kiln against its peers (goals of issue 15 in brackets) =="
if [ -f "$work/cas.txt" ]; then
  grep -h '^kiln / ' "$work/cas.txt" | sed 's/^/CAS [every row >= 1.5x, every round]: /' || true
fi
if [ -f "$work/sandbox.txt" ]; then
  awk '$1 == "sandboxd-cold/bwrap-p50" { p = $2 } $1 == "sandboxd-cold/bwrap-cpu" { c = $2 }
       $1 == "sandboxd-warm/bwrap-p50" { wp = $2 }
       END { if (p != "") printf "sandbox cold start: p50 %.2fx bwrap [<= 1.5], CPU %.2fx bwrap [<= 2]; prepared ahead: p50 %.2fx\n", p, c, wp }' "$work/sandbox.txt"
fi
if [ -f "$work/exec.txt" ]; then
  grep -h '^ratios:' "$work/exec.txt" | sed 's/^ratios: /Bazel build [kiln\/linux-sandbox <= 1.0, kiln\/buildbarn <= 0.8, all-cache-hit <= 1.0]: /' || true
  grep -h '^kiln CPU in a clean build\|^buildbarn CPU in a clean build' "$work/exec.txt" || true
fi
