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
"$KILN" serve --data "$work/kiln" --listen 127.0.0.1:18801 --http-listen "" --log-level warn &
pids+=($!)
wait_port 18801
"$work/casbench" --addr 127.0.0.1:18801 --name kiln | tee "$work/kiln.txt"
# The other physical limit of a disk store: how fast this filesystem takes writes.
dd if=/dev/zero of="$work/dd.out" bs=1M count=512 conv=fsync 2>&1 | awk '/copied/ { print "filesystem write ceiling (dd 512 MiB, fsync): " $(NF-1) " " $NF }'
rm -f "$work/dd.out"
kill "${pids[-1]}"
if [ -n "${BAZEL_REMOTE:-}" ] && [ -x "$BAZEL_REMOTE" ]; then
  "$BAZEL_REMOTE" --dir "$work/br" --max_size 20 --storage_mode uncompressed --grpc_address 127.0.0.1:18802 --http_address 127.0.0.1:18803 >/dev/null 2>&1 &
  pids+=($!)
  wait_port 18802
  "$work/casbench" --addr 127.0.0.1:18802 --name bazel-remote | tee "$work/br.txt"
  kill "${pids[-1]}"
else
  echo "bazel-remote: skipped (set BAZEL_REMOTE=/path/to/bazel-remote for a side-by-side run)"
fi

fi

if want s3; then
echo
echo "== Shared storage (S3): kiln with its local tier vs bazel-remote's S3 proxy, one versitygw =="
# FindMissing sends fewer digests than in the disk rows: half of them are absent, and
# each absent digest costs both servers a HEAD to the bucket.
find=${S3_FIND:-200000}
vgw=$(command -v versitygw || echo "$(go env GOPATH)/bin/versitygw")
if [ ! -x "$vgw" ]; then
  echo "versitygw: not installed (make setup installs it); S3 rows skipped"
else
  [ -x "$work/casbench" ] || go build -o "$work/casbench" ./test/bench/casbench
  # Free ports, so this part runs beside other benchmarks on a shared machine.
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  p_s3=$(free_port) p_disk=$(free_port) p_kiln=$(free_port) p_br=$(free_port) p_brh=$(free_port)
  mkdir -p "$work/s3/kiln-bench" "$work/s3/br-bench"
  export AWS_ACCESS_KEY_ID=benchkey AWS_SECRET_ACCESS_KEY=benchsecret AWS_EC2_METADATA_DISABLED=true
  "$vgw" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" --port 127.0.0.1:$p_s3 --keep-alive --quiet posix "$work/s3" >/dev/null 2>&1 &
  pids+=($!)
  wait_port $p_s3; kill -0 "${pids[-1]}" || { echo "bench: the server for port $p_s3 died" >&2; exit 1; }
  # The disk-only store, same flags: the reference for downloads of locally held blobs.
  "$KILN" serve --data "$work/kiln-disk" --listen 127.0.0.1:$p_disk --http-listen "" --log-level warn --no-execution --allow-client-ac-writes &
  pids+=($!)
  wait_port $p_disk; kill -0 "${pids[-1]}" || { echo "bench: the server for port $p_disk died" >&2; exit 1; }
  "$work/casbench" --addr 127.0.0.1:$p_disk --name kiln-disk --find "$find" --save "$work/kiln-disk.json"
  kill "${pids[-1]}"
  "$KILN" serve --data "$work/kiln-s3" --listen 127.0.0.1:$p_kiln --http-listen "" --log-level warn --no-execution --allow-client-ac-writes \
    --max-size 20GiB --storage "s3://kiln-bench/?endpoint=http://127.0.0.1:$p_s3&region=us-east-1&path-style=true" &
  pids+=($!)
  wait_port $p_kiln; kill -0 "${pids[-1]}" || { echo "bench: the server for port $p_kiln died" >&2; exit 1; }
  "$work/casbench" --addr 127.0.0.1:$p_kiln --name kiln-s3 --find "$find" --save "$work/kiln-s3.json" --vs "$work/kiln-disk.json"
  kill "${pids[-1]}"
  if [ -n "${BAZEL_REMOTE:-}" ] && [ -x "$BAZEL_REMOTE" ]; then
    "$BAZEL_REMOTE" --dir "$work/br-s3" --max_size 20 --storage_mode uncompressed --grpc_address 127.0.0.1:$p_br --http_address 127.0.0.1:$p_brh \
      --s3.endpoint 127.0.0.1:$p_s3 --s3.bucket br-bench --s3.region us-east-1 --s3.disable_ssl --s3.bucket_lookup_type path \
      --s3.auth_method access_key --s3.access_key_id "$AWS_ACCESS_KEY_ID" --s3.secret_access_key "$AWS_SECRET_ACCESS_KEY" >"$work/br-s3.log" 2>&1 &
    pids+=($!)
    wait_port $p_br; kill -0 "${pids[-1]}" || { echo "bench: the server for port $p_br died" >&2; exit 1; }
    "$work/casbench" --addr 127.0.0.1:$p_br --name bazel-remote-s3 --find "$find" --save "$work/br-s3.json"
    "$work/casbench" --compare "$work/kiln-s3.json" "$work/br-s3.json"
    kill "${pids[-1]}"
  else
    echo "bazel-remote: skipped (set BAZEL_REMOTE=/path/to/bazel-remote for the side-by-side S3 row)"
  fi
fi
fi

for part in sandbox exec; do
  if want "$part" && [ -x "scripts/bench-$part.sh" ]; then echo; "scripts/bench-$part.sh"; fi
done
