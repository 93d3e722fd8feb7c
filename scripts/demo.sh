#!/usr/bin/env bash
# demo.sh: the main job on the embedded default. Builds the debian-gcc toolchain (from
# the recipe cache when present), starts `kiln serve` on a fresh data dir, builds
# examples/bazel-hello with Debian's Bazel 4.2.3 with every action executed by kiln,
# runs the binary, rebuilds from the cache, then checks the build's signed links and
# its reproducibility.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-$PWD/bin/kiln}
DEMO=${DEMO_DIR:-$(mktemp -d /tmp/kiln-demo.XXXXXX)}
data=$DEMO/data
port=${PORT:-18980}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pids=()
cleanup() {
  (cd "$DEMO/ws" 2>/dev/null && bazel --output_user_root="$DEMO/bazel" shutdown >/dev/null 2>&1) || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

say "toolchain: debian-gcc (Debian bookworm gcc), pinned by digest"
digest=$(toolchains/debian-gcc/build.sh --data "$data" --kiln "$KILN")
image="docker://kiln/debian-gcc@$digest"
echo "container-image=$image"

say "kiln serve on 127.0.0.1:$port (data: $data)"
"$KILN" serve --data "$data" --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$((port + 1))" --log-level warn &
pids+=($!)
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done

say "bazel build //... with every action executed remotely by kiln"
cp -r examples/bazel-hello "$DEMO/ws"
rm -f "$DEMO"/ws/bazel-*
cd "$DEMO/ws"
flags=(--remote_executor="grpc://127.0.0.1:$port" --remote_default_exec_properties="container-image=$image" --jobs=8)
bazel --output_user_root="$DEMO/bazel" build "${flags[@]}" //... 2>&1 | grep -E "^(INFO: [0-9]+ processes|ERROR|FAILED)" || true
./bazel-bin/app/hello
echo "words counted: $(cat bazel-bin/app/words.count)"

say "bazel clean, build again: every action is a remote cache hit"
bazel --output_user_root="$DEMO/bazel" clean >/dev/null 2>&1
bazel --output_user_root="$DEMO/bazel" build "${flags[@]}" //... 2>&1 | grep -E "^(INFO: [0-9]+ processes|ERROR|FAILED)" || true
cd - >/dev/null

say "kiln metrics"
curl -s "http://127.0.0.1:$((port + 1))/metrics" | grep -E '^kiln_(executions_total|action_cache_lookups_total)' || true

for step in scripts/demo-*.sh; do
  [ -x "$step" ] && DEMO="$DEMO" KILN="$KILN" DATA="$data" IMAGE="$image" WS="$DEMO/ws" "$step"
done
say "done: everything is under $DEMO"
