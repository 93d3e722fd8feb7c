#!/usr/bin/env bash
# bench-exec.sh: a Bazel workspace of ~300 small actions (cc_library compiles and
# archives, genrules) built at --jobs=8 four ways in one run: Bazel local, Bazel
# linux-sandbox, kiln remote execution (full sandbox), and kiln's all-cache-hit rebuild.
# Prints wall times, ratios, and kiln's per-action time by phase.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-$PWD/bin/kiln}
N=${N:-100}            # cc_library targets (2 actions each) and genrules (1 each)
# CONC sets kiln serve --concurrency (default 0: the number of CPUs).
work=$(mktemp -d /tmp/kiln-bench-exec.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true;
  (cd "$work/ws" 2>/dev/null && bazel --output_user_root="$work/bz" shutdown >/dev/null 2>&1) || true; rm -rf "$work"; }
trap cleanup EXIT

echo "== remote execution: $((3*N)) actions at --jobs=8 =="
ws=$work/ws
cp -r examples/bazel-hello "$ws"
rm -f "$ws"/bazel-*
mkdir -p "$ws/gen"
{
  echo 'load("@rules_cc//cc:defs.bzl", "cc_library")'
  for i in $(seq "$N"); do
    printf 'int f%d(int x) { int s = 0; for (int i = 0; i < x; i++) s += i * %d; return s; }\n' "$i" "$i" > "$ws/gen/f$i.c"
    printf 'cc_library(name = "lib%d", srcs = ["f%d.c"])\n' "$i" "$i"
    printf 'genrule(name = "g%d", outs = ["g%d.txt"], cmd = "echo %d | sha256sum > $@")\n' "$i" "$i" "$i"
  done
} > "$ws/gen/BUILD"

data=$work/data
digest=$(toolchains/debian-gcc/build.sh --data "$data" --kiln "$KILN")
"$KILN" toolchain unpack --data "$data" "$digest" >/dev/null   # unpacked once, outside the timing
image="docker://kiln/debian-gcc@$digest"
"$KILN" serve --data "$data" --listen 127.0.0.1:18811 --http-listen 127.0.0.1:18812 --log-level warn --concurrency "${CONC:-0}" &
pids+=($!)
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/18811) 2>/dev/null && break; sleep 0.05; done

bz() { (cd "$ws" && bazel --output_user_root="$work/bz" "$@"); }
timed() { local s e; s=$(date +%s.%N); "$@" >"$work/last.log" 2>&1 || { tail -20 "$work/last.log"; exit 1; }; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN { printf "%.3f", b - a }'; }
bz build --nobuild //gen:all >/dev/null 2>&1   # warm the Bazel server and analysis
common=(build --jobs=8 //gen:all)
bz clean >/dev/null 2>&1; t_local=$(timed bz "${common[@]}" --spawn_strategy=local)
bz clean >/dev/null 2>&1; t_sandbox=$(timed bz "${common[@]}" --spawn_strategy=linux-sandbox)
# kiln_cpu: CPU seconds of kiln serve, its sandbox daemon and everything they reaped
# (the sandboxes and the actions in them), from /proc (utime stime cutime cstime).
kiln_cpu() {
  local p ps=("${pids[0]}") total=0
  ps+=($(cat /proc/"${pids[0]}"/task/*/children 2>/dev/null))
  for p in "${ps[@]}"; do
    total=$(awk -v t="$total" '{ sub(/^.*\) /, ""); print t + $12 + $13 + $14 + $15 }' /proc/"$p"/stat 2>/dev/null || echo "$total")
  done
  awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}
bz clean >/dev/null 2>&1; c0=$(kiln_cpu)
t_kiln=$(timed bz "${common[@]}" --remote_executor=grpc://127.0.0.1:18811 --remote_default_exec_properties=container-image="$image")
c_kiln=$(awk -v a="$c0" -v b="$(kiln_cpu)" 'BEGIN { printf "%.2f", b - a }')
grep -E "INFO: [0-9]+ processes" "$work/last.log" | tail -1
bz clean >/dev/null 2>&1; t_hit=$(timed bz "${common[@]}" --remote_executor=grpc://127.0.0.1:18811 --remote_default_exec_properties=container-image="$image")
grep -E "INFO: [0-9]+ processes" "$work/last.log" | tail -1

printf '%-34s %8.2f s\n' "bazel local" "$t_local" "bazel linux-sandbox" "$t_sandbox" \
  "kiln remote execution (sandboxed)" "$t_kiln" "kiln all-cache-hit rebuild" "$t_hit"
awk -v k="$t_kiln" -v l="$t_local" -v s="$t_sandbox" 'BEGIN { printf "ratios: kiln/local %.2f  kiln/linux-sandbox %.2f\n", k / l, k / s }'
echo "kiln CPU in the clean build (kiln serve + its sandbox daemon + the sandboxes and actions): $c_kiln s"
echo "kiln per-action time by phase (mean over the clean build):"
curl -s http://127.0.0.1:18812/metrics | awk '
  /^kiln_execution_phase_seconds_sum/ { match($0, /phase="[a-z_]+"/); p=substr($0, RSTART+7, RLENGTH-8); sum[p]=$2 }
  /^kiln_execution_phase_seconds_count/ { match($0, /phase="[a-z_]+"/); p=substr($0, RSTART+7, RLENGTH-8); cnt[p]=$2 }
  END { for (p in sum) if (cnt[p] > 0) printf "  %-14s %7.1f ms  (%d actions)\n", p, 1000*sum[p]/cnt[p], cnt[p]
        if (cnt["attest"] > 0 && sum["total"] > 0) printf "  attestation share of worker time: %.2f%%\n", 100*sum["attest"]/sum["total"] }'
