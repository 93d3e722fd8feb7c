#!/usr/bin/env bash
# bench.sh: kiln's benchmarks, each beside its peers in the same run, printing ratios.
# Peers that are not installed are skipped with a note (bazel-remote is not packaged
# in Debian: build it from source yourself and point BAZEL_REMOTE at the binary).
#
#   scripts/bench.sh [cas|s3|sandbox|exec]...   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-$PWD/bin/kiln}
work=$(mktemp -d /tmp/kiln-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# wait_port waits until something listens on 127.0.0.1:$1.
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "bench: nothing listening on $1" >&2; return 1; }

parts=${*:-cas s3 sandbox exec}
want() { [[ " $parts " == *" $1 "* ]]; }

if want cas; then
echo "== CAS (ByteStream 1 MiB x 8 streams, BatchUpdate 4 KiB, FindMissing) =="
go build -o "$work/casbench" ./test/bench/casbench
"$KILN" serve --data "$work/kiln" --listen 127.0.0.1:18801 --http-listen "" --log-level warn ${SERVE_ARGS:-} &
pids+=($!)
wait_port 18801
# --pid: casbench also prints each server's CPU per MiB, blob and digest, which does not
# depend on the share of the machine a server gets (the load, or kiln's per-client
# CPU rate, --client-max-cpus, which holds only while clients share the server: not
# for casbench's one client, unless --client-max-cpus-always is in SERVE_ARGS).
servers=(--server kiln=127.0.0.1:18801 --pid kiln=$!)
if [ -n "${BAZEL_REMOTE:-}" ] && [ -x "$BAZEL_REMOTE" ]; then
  "$BAZEL_REMOTE" --dir "$work/br" --max_size 20 --storage_mode uncompressed --grpc_address 127.0.0.1:18802 --http_address 127.0.0.1:18803 >/dev/null 2>&1 &
  pids+=($!)
  wait_port 18802
  servers+=(--server bazel-remote=127.0.0.1:18802 --pid bazel-remote=$!)
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

if want s3; then
echo
echo "== Shared storage (S3): kiln with its local tier vs bazel-remote's S3 proxy, one versitygw =="
# All servers run at once on one versitygw; each round measures them in turn (the order
# rotates) with fresh blobs, and the medians of the rounds are compared, so load from
# elsewhere on a shared machine hits every server alike. FindMissing sends fewer
# digests than in the disk rows: half are absent, and an absent digest costs both
# servers a HEAD to the bucket. bazel-remote's upload rows time its local disk only:
# it sends blobs to S3 later, from a queue.
find=${S3_FIND:-200000}
rounds=${S3_ROUNDS:-3}
vgw=$(command -v versitygw || echo "$(go env GOPATH)/bin/versitygw")
if [ ! -x "$vgw" ]; then
  echo "versitygw: not installed (make setup installs it); S3 rows skipped"
else
  [ -x "$work/casbench" ] || go build -o "$work/casbench" ./test/bench/casbench
  # Free ports, so this part runs beside other benchmarks on a shared machine.
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  p_s3=$(free_port) p_disk=$(free_port) p_kiln=$(free_port) p_br=$(free_port) p_brh=$(free_port)
  started() { wait_port "$1" && kill -0 "${pids[-1]}" || { echo "bench: the server for port $1 died" >&2; exit 1; }; }
  mkdir -p "$work/s3/kiln-bench" "$work/s3/br-bench"
  export AWS_ACCESS_KEY_ID=benchkey AWS_SECRET_ACCESS_KEY=benchsecret AWS_EC2_METADATA_DISABLED=true
  "$vgw" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" --port "127.0.0.1:$p_s3" --keep-alive --quiet posix "$work/s3" >/dev/null 2>&1 &
  pids+=($!); started "$p_s3"
  # The disk-only store, same flags: the reference for downloads of locally held blobs.
  "$KILN" serve --data "$work/kiln-disk" --listen "127.0.0.1:$p_disk" --http-listen "" --log-level warn --no-execution --allow-client-ac-writes &
  pids+=($!); started "$p_disk"
  "$KILN" serve --data "$work/kiln-s3" --listen "127.0.0.1:$p_kiln" --http-listen "" --log-level warn --no-execution --allow-client-ac-writes \
    --max-size 20GiB --storage "s3://kiln-bench/?endpoint=http://127.0.0.1:$p_s3&region=us-east-1&path-style=true" &
  pids+=($!); started "$p_kiln"
  servers=("kiln-disk $p_disk" "kiln-s3 $p_kiln")
  if [ -n "${BAZEL_REMOTE:-}" ] && [ -x "$BAZEL_REMOTE" ]; then
    "$BAZEL_REMOTE" --dir "$work/br-s3" --max_size 20 --storage_mode uncompressed --grpc_address "127.0.0.1:$p_br" --http_address "127.0.0.1:$p_brh" \
      --s3.endpoint "127.0.0.1:$p_s3" --s3.bucket br-bench --s3.region us-east-1 --s3.disable_ssl --s3.bucket_lookup_type path \
      --s3.auth_method access_key --s3.access_key_id "$AWS_ACCESS_KEY_ID" --s3.secret_access_key "$AWS_SECRET_ACCESS_KEY" >"$work/br-s3.log" 2>&1 &
    pids+=($!); started "$p_br"
    servers+=("bazel-remote-s3 $p_br")
  else
    echo "bazel-remote: skipped (set BAZEL_REMOTE=/path/to/bazel-remote for the side-by-side S3 row)"
  fi
  for r in $(seq "$rounds"); do
    n=${#servers[@]}
    for i in $(seq 0 $((n - 1))); do
      read -r name port <<<"${servers[$(((i + r) % n))]}"
      "$work/casbench" --addr "127.0.0.1:$port" --name "$name" --find "$find" --save "$work/$name.$r.json"
      sleep 5 # let deferred work (bazel-remote's upload queue) settle before the next server
    done
  done
  files() { local f=(); for r in $(seq "$rounds"); do f+=("$work/$1.$r.json"); done; local IFS=,; echo "${f[*]}"; }
  "$work/casbench" --compare "$(files kiln-s3)" "$(files kiln-disk)"
  if [ ${#servers[@]} -gt 2 ]; then
    "$work/casbench" --compare "$(files kiln-s3)" "$(files bazel-remote-s3)"
  fi
fi
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
  grep -h '^server CPU per unit' "$work/cas.txt" | sed 's/^/CAS, what each costs the server (above 1: kiln spends less): /' || true
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
