#!/usr/bin/env bash
# bench-exec.sh: a Bazel workspace of 4N small actions (cc_library compiles, archives
# and shared-library links, genrules) built at --jobs=8 in one run: Bazel local, Bazel
# linux-sandbox, kiln remote execution (full sandbox), and kiln's all-cache-hit rebuild.
# Prints wall times, ratios, and kiln's per-action time by phase.
#
# ROUNDS=N (default 1) repeats every build N times (after a warm-up round, see WARMUP), interleaved (local, linux-sandbox,
# kiln, kiln all-cache-hit, Buildbarn, Buildbarn all-cache-hit, then again), each round
# on sources of its own so that no round hits another's cache, and prints the median of
# each and every round's ratios: on a shared machine the load changes during a run, and
# only builds made close together compare. Each build also prints how idle the machine's
# CPUs were while it ran (/proc/stat, every process's use counted, not only the build's).
#
# PROFILE=DIR records where kiln serve's own CPU goes (perf record -g on its threads,
# not its sandboxes) during round 1's clean and all-cache-hit builds, into
# DIR/kiln-{clean,hit}.perf.data, with the top symbols in DIR/kiln-{clean,hit}.txt.
#
# BUILDBARN=DIR (optional) also runs the peer in the same run: Buildbarn remote execution
# from DIR/{bb_storage,bb_scheduler,bb_worker,bb_runner}, straight on the host with no
# sandbox (bb_storage as CAS/AC on disk and as the Execute frontend, the scheduler, one
# worker with a native build directory, one bb_runner with as many slots as kiln's
# --concurrency), and prints its clean-build and all-cache-hit times, the kiln/buildbarn
# ratios and its per-action time by stage. Buildbarn is not part of kiln; build it
# outside the repo (Go >= 1.26.6, module proxy only; its *.pb.go files are committed):
#   git clone https://github.com/buildbarn/bb-storage /tmp/buildbarn/src/bb-storage
#   git clone https://github.com/buildbarn/bb-remote-execution /tmp/buildbarn/src/bb-remote-execution
#   export GONOSUMDB=github.com/bazelbuild,github.com/buildbarn GOTOOLCHAIN=local GOFLAGS=-mod=mod
#   cd /tmp/buildbarn/src/bb-remote-execution   # and make the two edits described below
#   go build -o /tmp/buildbarn/bin/ ./cmd/bb_scheduler ./cmd/bb_worker ./cmd/bb_runner
#   cd /tmp/buildbarn/src/bb-storage   # its Bazel build patches genproto's bytestream:
#   cp -r "$(go list -m -f '{{.Dir}}' google.golang.org/genproto/googleapis/bytestream)" /tmp/buildbarn/bytestream
#   chmod -R u+w /tmp/buildbarn/bytestream && (cd /tmp/buildbarn/bytestream &&
#     patch -p0 < /tmp/buildbarn/src/bb-storage/patches/org_golang_google_genproto_googleapis_bytestream/service-registrar.diff)
#   go mod edit -replace google.golang.org/genproto/googleapis/bytestream=/tmp/buildbarn/bytestream
#   go build -o /tmp/buildbarn/bin/ ./cmd/bb_storage
#   BUILDBARN=/tmp/buildbarn/bin scripts/bench-exec.sh
# CLUSTER=1 also runs, in the same run, a kiln cluster (docs/cluster.md: nats-server, one
# frontend, two workers each with --concurrency half the CPUs, the sequencer) beside a
# single-process `kiln serve --storage` on the same versitygw (so both pay the bucket),
# both clean: the same build at --jobs=8, and N genrules one at a time (--jobs=1), whose
# time difference divided by N is what the cluster path adds per action; then each
# side's per-action time by phase, for the genrules alone and for everything.
# Since bb-remote-execution e6ab874 (2026-03) Buildbarn refuses REv2.0, which Debian's
# Bazel 4.2.3 speaks; two edits let it through: lower the scheduler's DeprecatedApiVersion
# from 2.2 to 2.0 (pkg/scheduler/in_memory_build_queue.go) and make the worker take
# Command.output_files + output_directories as output_paths when output_paths is empty
# (pkg/builder/output_hierarchy.go). The worker's platform is OSFamily=linux, and the
# Buildbarn build passes --remote_default_exec_properties=OSFamily=linux.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-$PWD/bin/kiln}
N=${N:-100}            # cc_library targets (3 actions each) and genrules (1 each)
# CONC sets kiln serve --concurrency (default 0: the number of CPUs).
work=$(mktemp -d /tmp/kiln-bench-exec.XXXXXX)
pids=() bbpids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true;
  (cd "$work/ws" 2>/dev/null && bazel --output_user_root="$work/bz" shutdown >/dev/null 2>&1) || true; rm -rf "$work"; }
trap cleanup EXIT

echo "== remote execution: $((4*N)) actions at --jobs=8 =="
ws=$work/ws
cp -r examples/bazel-hello "$ws"
rm -f "$ws"/bazel-*
mkdir -p "$ws/gen"
# gen_ws writes the workspace's sources for round $1: every action differs from round to
# round (the round is in each function's result and each genrule), so no cache carries over.
gen_ws() {
  {
    echo 'load("@rules_cc//cc:defs.bzl", "cc_library")'
    for i in $(seq "$N"); do
      printf 'int f%d(int x) { int s = 0; for (int i = 0; i < x; i++) s += i * %d; return s + %d; }\n' "$i" "$i" "$1" > "$ws/gen/f$i.c"
      printf 'cc_library(name = "lib%d", srcs = ["f%d.c"])\n' "$i" "$i"
      printf 'genrule(name = "g%d", outs = ["g%d.txt"], cmd = "echo %d %d | sha256sum > $@")\n' "$i" "$i" "$i" "$1"
    done
  } > "$ws/gen/BUILD"
}
gen_ws 1

data=$work/data
digest=$(toolchains/debian-gcc/build.sh --data "$data" --kiln "$KILN")
"$KILN" toolchain unpack --data "$data" "$digest" >/dev/null   # unpacked once, outside the timing
image="docker://kiln/debian-gcc@$digest"
"$KILN" serve --data "$data" --listen 127.0.0.1:18811 --http-listen 127.0.0.1:18812 --log-level warn --concurrency "${CONC:-0}" &
pids+=($!)
waitport() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "nothing listens on port $1" >&2; tail -n5 "$work"/bb/*.log 2>/dev/null; exit 1; }
waitport 18811

if [[ -n ${BUILDBARN:-} ]]; then
  bb=$work/bb; mkdir -p "$bb/build" "$bb/cache"
  slots=${CONC:-0}; [[ $slots -gt 0 ]] || slots=$(nproc)
  bbdisk() {  # a "local" blob access on sparse files in $bb, like bb-deployments' storage.jsonnet
    printf '{ "local": { "keyLocationMapOnBlockDevice": { "file": { "path": "%s/%s-klm", "sizeBytes": 67108864 } },
      "keyLocationMapMaximumGetAttempts": 16, "keyLocationMapMaximumPutAttempts": 64,
      "oldBlocks": 8, "currentBlocks": 24, "newBlocks": %d,
      "blocksOnBlockDevice": { "source": { "file": { "path": "%s/%s-blocks", "sizeBytes": %d } }, "spareBlocks": 3 } } }' \
      "$bb" "$1" "$3" "$bb" "$1" "$2"
  }
  allow='"authenticationPolicy": { "allow": {} }'
  diag() { echo '"global": { "diagnosticsHttpServer": { "httpServers": [{ "listenAddresses": ["127.0.0.1:'"$1"'"], '"$allow"' }], "enablePrometheus": true } }'; }
  cat > "$bb/storage.json" <<EOF
{ "grpcServers": [{ "listenAddresses": ["127.0.0.1:18821"], $allow }],
  "schedulers": { "": { "endpoint": { "address": "127.0.0.1:18822" } } },
  "executeAuthorizer": { "allow": {} },
  "maximumMessageSizeBytes": 16777216,
  "contentAddressableStorage": { "backend": $(bbdisk cas 1073741824 3),
    "getAuthorizer": { "allow": {} }, "putAuthorizer": { "allow": {} }, "findMissingAuthorizer": { "allow": {} } },
  "actionCache": { "backend": $(bbdisk ac 134217728 1),
    "getAuthorizer": { "allow": {} }, "putAuthorizer": { "allow": {} } } }
EOF
  cat > "$bb/scheduler.json" <<EOF
{ "clientGrpcServers": [{ "listenAddresses": ["127.0.0.1:18822"], $allow }],
  "workerGrpcServers": [{ "listenAddresses": ["127.0.0.1:18823"], $allow }],
  "browserUrl": "http://127.0.0.1:1",
  "contentAddressableStorage": { "grpc": { "client": { "address": "127.0.0.1:18821" } } },
  "maximumMessageSizeBytes": 16777216,
  $(diag 18825),
  "executeAuthorizer": { "allow": {} }, "modifyDrainsAuthorizer": { "allow": {} },
  "killOperationsAuthorizer": { "allow": {} }, "synchronizeAuthorizer": { "allow": {} },
  "actionRouter": { "simple": { "platformKeyExtractor": { "action": {} },
    "invocationKeyExtractors": [{ "toolInvocationId": {} }],
    "initialSizeClassAnalyzer": { "defaultExecutionTimeout": "1800s", "maximumExecutionTimeout": "7200s" } } },
  "platformQueueWithNoWorkersTimeout": "900s" }
EOF
  cat > "$bb/worker.json" <<EOF
{ "blobstore": {
    "contentAddressableStorage": { "grpc": { "client": { "address": "127.0.0.1:18821" } } },
    "actionCache": { "grpc": { "client": { "address": "127.0.0.1:18821" } } } },
  "browserUrl": "http://127.0.0.1:1",
  "maximumMessageSizeBytes": 16777216,
  "scheduler": { "address": "127.0.0.1:18823" },
  $(diag 18824),
  "buildDirectories": [{
    "native": { "buildDirectoryPath": "$bb/build", "cacheDirectoryPath": "$bb/cache",
      "maximumCacheFileCount": 10000, "maximumCacheSizeBytes": 1073741824, "cacheReplacementPolicy": "LEAST_RECENTLY_USED" },
    "runners": [{ "endpoint": { "address": "unix:$bb/runner.sock" }, "concurrency": $slots,
      "maximumFilePoolFileCount": 10000, "maximumFilePoolSizeBytes": 1073741824,
      "platform": { "properties": [{ "name": "OSFamily", "value": "linux" }] },
      "workerId": { "host": "localhost" } }] }],
  "filePool": { "blockDevice": { "file": { "path": "$bb/filepool", "sizeBytes": 1073741824 } } },
  "inputDownloadConcurrency": 10, "outputUploadConcurrency": 11 }
EOF
  cat > "$bb/runner.json" <<EOF
{ "buildDirectoryPath": "$bb/build", "grpcServers": [{ "listenPaths": ["$bb/runner.sock"], $allow }] }
EOF
  for c in storage scheduler runner worker; do
    "$BUILDBARN/bb_$c" "$bb/$c.json" >"$bb/$c.log" 2>&1 &
    pids+=($!); bbpids+=($!)
    case $c in storage) waitport 18821;; scheduler) waitport 18822; waitport 18825;; runner) for _ in $(seq 200); do [[ -S $bb/runner.sock ]] && break; sleep 0.05; done;; esac
  done
  for _ in $(seq 200); do  # until the worker has registered with the scheduler
    curl -s http://127.0.0.1:18825/metrics | grep -q '^buildbarn_builder_in_memory_build_queue_workers_created_total.* [1-9]' && break; sleep 0.05
  done
fi

bz() { (cd "$ws" && bazel --output_user_root="$work/bz" "$@"); }
# cpu_jiffies prints the idle and total jiffies of the machine's CPUs.
cpu_jiffies() { awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat; }
# timed runs a build and sets t (seconds) and idle (% of the machine's CPU time idle).
timed() {
  local s e j0 j1
  j0=$(cpu_jiffies); s=$(date +%s.%N)
  "$@" >"$work/last.log" 2>&1 || { tail -20 "$work/last.log"; exit 1; }
  e=$(date +%s.%N); j1=$(cpu_jiffies)
  t=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.3f", b - a }')
  idle=$(awk -v a="$j0" -v b="$j1" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]) }')
}
bz build --nobuild //gen:all >/dev/null 2>&1   # warm the Bazel server and analysis
common=(build --jobs=8 //gen:all)
# kiln_cpu: CPU seconds of kiln serve, its sandbox daemon and everything they reaped
# (the sandboxes and the actions in them), from /proc (utime stime cutime cstime), as
# "total serve daemon": serve and daemon are each process's own use alone.
kiln_cpu() {
  local p ps=("${pids[0]}") total=0 own
  ps+=($(cat /proc/"${pids[0]}"/task/*/children 2>/dev/null))
  for p in "${ps[@]}"; do
    total=$(awk -v t="$total" '{ sub(/^.*\) /, ""); print t + $12 + $13 + $14 + $15 }' /proc/"$p"/stat 2>/dev/null || echo "$total")
  done
  own=$(for p in "${ps[@]}"; do awk '{ sub(/^.*\) /, ""); printf "%d ", $12 + $13 }' /proc/"$p"/stat 2>/dev/null; done)
  awk -v t="$total" -v o="$own" -v hz="$(getconf CLK_TCK)" 'BEGIN { n = split(o, x, " "); d = 0; for (i = 2; i <= n; i++) d += x[i]
    printf "%.2f %.2f %.2f", t / hz, x[1] / hz, d / hz }'
}
# bb_cpu: CPU seconds of the Buildbarn processes and the actions bb_runner reaped.
bb_cpu() {
  local p total=0
  for p in "${bbpids[@]}"; do
    total=$(awk -v t="$total" '{ sub(/^.*\) /, ""); print t + $12 + $13 + $14 + $15 }' /proc/"$p"/stat 2>/dev/null || echo "$total")
  done
  awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}
kx=(--remote_executor=grpc://127.0.0.1:18811 --remote_default_exec_properties=container-image="$image")
bbx=(--remote_executor=grpc://127.0.0.1:18821 --remote_default_exec_properties=OSFamily=linux)
names=(local sandbox kiln hit)
[[ -z ${BUILDBARN:-} ]] || names+=(bb bbhit)
declare -A T IDLE CPU
CPUSERVE= CPUDAEMON=
rounds=${ROUNDS:-1}
# one NAME FLAGS...: a clean build of this round, recorded under NAME.
one() {
  local name=$1 c0=; shift
  bz clean >/dev/null 2>&1
  case $name in kiln) c0=$(kiln_cpu);; bb) c0=$(bb_cpu);; esac
  local perf=
  if [[ -n ${PROFILE:-} && $r -eq 1 && ( $name == kiln || $name == hit ) ]]; then
    mkdir -p "$PROFILE"
    local pf="$PROFILE/kiln-$([[ $name == kiln ]] && echo clean || echo hit)"
    perf record -F 999 -g -p "${pids[0]}" -o "$pf.perf.data" >/dev/null 2>&1 &
    perf=$!
    sleep 0.5
  fi
  timed bz "${common[@]}" "$@"
  if [[ -n $perf ]]; then
    kill -INT "$perf"; wait "$perf" 2>/dev/null || true
    perf report -i "$pf.perf.data" --no-children --sort sym -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60 > "$pf.txt" || true
  fi
  T[$name]+="$t " IDLE[$name]+="$idle "
  case $name in kiln) c1=$(kiln_cpu); CPU[$name]+="$(awk -v a="$c0" -v b="$c1" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", y[1] - x[1] }') "
                  CPUSERVE+="$(awk -v a="$c0" -v b="$c1" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", y[2] - x[2] }') "
                  CPUDAEMON+="$(awk -v a="$c0" -v b="$c1" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", y[3] - x[3] }') ";;
                bb) CPU[$name]+="$(awk -v a="$c0" -v b="$(bb_cpu)" 'BEGIN { printf "%.2f", b - a }') ";; esac
  case $name in kiln|hit|bb|bbhit) printf '  round %d %-7s %7.2f s, machine idle %3d%%  (%s)\n' "$r" "$name" "$t" "$idle" \
    "$(grep -E "INFO: [0-9]+ processes" "$work/last.log" | tail -1 | sed 's/^INFO: //')";;
  *) printf '  round %d %-7s %7.2f s, machine idle %3d%%\n' "$r" "$name" "$t" "$idle";; esac
}
[[ -z ${CLUSTER_ONLY:-} ]] || rounds=0  # CLUSTER_ONLY=1: only the cluster comparison below
# WARMUP=1 (the default; 0 skips it): before round 1, every build once on sources of
# its own, not counted, so that no side's first round pays for its cold start (Bazel's
# JVM, the page cache of each toolchain's files, kiln's prepared sandboxes, Buildbarn's
# build directories) in the figures.
if [[ ${WARMUP:-1} -gt 0 && $rounds -gt 0 ]]; then
  gen_ws 0; bz build --nobuild //gen:all >/dev/null 2>&1
  warm() { bz clean >/dev/null 2>&1; timed bz "${common[@]}" "$@"; printf '  warm-up %-30s %7.2f s (not counted)\n' "$1" "$t"; }
  warm --spawn_strategy=local
  warm --spawn_strategy=linux-sandbox
  warm "${kx[@]}"
  [[ -z ${BUILDBARN:-} ]] || warm "${bbx[@]}"
  gen_ws 1; bz build --nobuild //gen:all >/dev/null 2>&1
fi
for r in $(seq "$rounds"); do
  [[ $r -eq 1 ]] || { gen_ws "$r"; bz build --nobuild //gen:all >/dev/null 2>&1; }
  one local --spawn_strategy=local
  one sandbox --spawn_strategy=linux-sandbox
  one kiln "${kx[@]}"
  one hit "${kx[@]}"
  if [[ -n ${BUILDBARN:-} ]]; then
    one bb "${bbx[@]}"
    one bbhit "${bbx[@]}"
  fi
done
# med prints the median of its arguments.
med() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
if [[ -z ${CLUSTER_ONLY:-} ]]; then
for n in "${names[@]}"; do declare "m_$n=$(med ${T[$n]})"; done
t_local=$m_local t_sandbox=$m_sandbox t_kiln=$m_kiln t_hit=$m_hit
c_kiln=$(med ${CPU[kiln]})
if [[ -n ${BUILDBARN:-} ]]; then t_bb=$m_bb t_bbhit=$m_bbhit c_bb=$(med ${CPU[bb]}); fi
if [[ $rounds -gt 1 ]]; then
  echo "per round: kiln/linux-sandbox, kiln/buildbarn, kiln all-cache-hit/buildbarn all-cache-hit"
  read -ra tk <<<"${T[kiln]}"; read -ra ts <<<"${T[sandbox]}"; read -ra th <<<"${T[hit]}"
  read -ra tb <<<"${T[bb]:-}"; read -ra tbh <<<"${T[bbhit]:-}"
  for i in $(seq 0 $((rounds - 1))); do
    awk -v r=$((i + 1)) -v k="${tk[$i]}" -v s="${ts[$i]}" -v h="${th[$i]}" -v b="${tb[$i]:-0}" -v bh="${tbh[$i]:-0}" \
      'BEGIN { printf "  round %d: %.2f", r, k / s; if (b > 0) printf "  %.2f  %.2f", k / b, h / bh; printf "\n" }'
  done
  echo "medians of $rounds rounds:"
fi

printf '%-34s %8.2f s\n' "bazel local" "$t_local" "bazel linux-sandbox" "$t_sandbox" \
  "kiln remote execution (sandboxed)" "$t_kiln" "kiln all-cache-hit rebuild" "$t_hit"
[[ -z ${BUILDBARN:-} ]] || printf '%-34s %8.2f s\n' "buildbarn remote execution (host)" "$t_bb" "buildbarn all-cache-hit rebuild" "$t_bbhit"
awk -v k="$t_kiln" -v l="$t_local" -v s="$t_sandbox" 'BEGIN { printf "ratios: kiln/local %.2f  kiln/linux-sandbox %.2f\n", k / l, k / s }'
[[ -z ${BUILDBARN:-} ]] || awk -v k="$t_kiln" -v b="$t_bb" -v kh="$t_hit" -v bh="$t_bbhit" \
  'BEGIN { printf "ratios: kiln/buildbarn %.2f  kiln/buildbarn all-cache-hit %.2f\n", k / b, kh / bh }'
echo "kiln CPU in a clean build (kiln serve + its sandbox daemon + the sandboxes and actions; median): $c_kiln s"
echo "  of which kiln serve itself $(med $CPUSERVE) s, the sandbox daemon itself $(med $CPUDAEMON) s (the rest: the sandboxes' set-up, kiln-init and the actions)"
echo "kiln per-action time by phase (mean over the clean builds):"
curl -s http://127.0.0.1:18812/metrics | awk '
  /^kiln_execution_phase_seconds_sum/ { match($0, /phase="[a-z_]+"/); p=substr($0, RSTART+7, RLENGTH-8); sum[p]=$2 }
  /^kiln_execution_phase_seconds_count/ { match($0, /phase="[a-z_]+"/); p=substr($0, RSTART+7, RLENGTH-8); cnt[p]=$2 }
  END { for (p in sum) if (cnt[p] > 0) printf "  %-14s %7.1f ms  (%d actions)\n", p, 1000*sum[p]/cnt[p], cnt[p]
        if (cnt["attest"] > 0 && sum["total"] > 0) printf "  attestation share of worker time: %.2f%%\n", 100*sum["attest"]/sum["total"] }'
fi
if [[ -n ${CLUSTER:-} ]]; then
  gobin=$(go env GOPATH)/bin
  cl=$work/cluster; mkdir -p "$cl/s3/bench" "$cl/js"
  export AWS_ACCESS_KEY_ID=kilnbench AWS_SECRET_ACCESS_KEY=kilnbenchsecret AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
  "$gobin/versitygw" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" --port 127.0.0.1:18850 --quiet posix "$cl/s3" >"$cl/vgw.log" 2>&1 &
  pids+=($!)
  "$gobin/nats-server" -js -sd "$cl/js" -a 127.0.0.1 -p 18851 >"$cl/nats.log" 2>&1 &
  pids+=($!)
  waitport 18850; waitport 18851
  st() { echo "s3://bench/$1?endpoint=http://127.0.0.1:18850&region=us-east-1&path-style=true"; }
  "$KILN" toolchain export --data "$data" "$digest" "$cl/gcc.tar" >/dev/null
  half=$(( $(nproc) / 2 )); [[ $half -gt 0 ]] || half=1
  # single process, shared storage
  "$KILN" toolchain import --data "$cl/single" --storage "$(st single)" --unpack "$cl/gcc.tar" >/dev/null
  "$KILN" serve --data "$cl/single" --storage "$(st single)" --listen 127.0.0.1:18852 --http-listen 127.0.0.1:18853 --log-level warn --concurrency "$(nproc)" &
  pids+=($!)
  # cluster: the toolchain reaches the workers through the bucket (unpacked before the timing)
  C=nats://127.0.0.1:18851
  "$KILN" toolchain import --data "$cl/fe" --storage "$(st cluster)" "$cl/gcc.tar" >/dev/null
  "$KILN" sequencer --cluster $C --storage "$(st cluster)" --data "$cl/seq" --log-level warn &
  pids+=($!)
  for w in w1 w2; do
    "$KILN" toolchain import --data "$cl/$w" --unpack "$cl/gcc.tar" >/dev/null
    "$KILN" attest pubkey --data "$cl/$w" --json > "$cl/$w.key"
    "$KILN" cluster admit-key --cluster $C "$cl/$w.key" >/dev/null
    "$KILN" worker --cluster $C --storage "$(st cluster)" --data "$cl/$w" --name "$w" --concurrency "$half" --log-level warn --http-listen 127.0.0.1:$((18860 + ${w#w})) &
    pids+=($!)
  done
  "$KILN" serve --cluster $C --storage "$(st cluster)" --data "$cl/fe" --listen 127.0.0.1:18854 --http-listen 127.0.0.1:18855 --log-level warn &
  pids+=($!)
  waitport 18852; waitport 18854
  sleep 2   # the workers join the queue
  gens=(); for i in $(seq "$N"); do gens+=("//gen:g$i"); done
  rx() { echo --remote_executor=grpc://127.0.0.1:$1 --remote_default_exec_properties=container-image="$image" --remote_instance_name="$2"; }
  # N genrules one at a time, so each pays the whole path once; three rounds, the order
  # alternating, each on a fresh instance name (all misses); then the full build.
  seqrow=()
  for r in 1 2 3; do
    if (( r % 2 )); then order=(18852 18854); else order=(18854 18852); fi
    for port in "${order[@]}"; do
      bz clean >/dev/null 2>&1; timed bz build --jobs=1 $(rx "$port" "r$r") "${gens[@]}"
      grep -qE "INFO: [0-9]+ processes: .*$N remote" "$work/last.log" || { grep -E "INFO: [0-9]+ processes" "$work/last.log"; echo "not all remote" >&2; exit 1; }
      if [[ $port == 18852 ]]; then ts[r]=$t; else tc[r]=$t; fi
    done
    seqrow+=("$(awk -v s="${ts[r]}" -v c="${tc[r]}" -v n="$N" 'BEGIN { printf "%.1f", 1000*(c-s)/n }')")
  done
  # the phases of the genrules alone, before the full builds add theirs
  curl -s http://127.0.0.1:18853/metrics > "$cl/serve-genrules.metrics"
  { curl -s http://127.0.0.1:18861/metrics; curl -s http://127.0.0.1:18862/metrics; } > "$cl/workers-genrules.metrics"
  curl -s http://127.0.0.1:18855/metrics > "$cl/frontend-genrules.metrics"
  bz clean >/dev/null 2>&1; timed bz "${common[@]}" $(rx 18852 full); t_sfull=$t
  bz clean >/dev/null 2>&1; timed bz "${common[@]}" $(rx 18854 full); t_cfull=$t
  grep -E "INFO: [0-9]+ processes" "$work/last.log" | tail -1
  echo "== kiln cluster (1 frontend, 2 workers x --concurrency $half, nats-server, sequencer) vs one kiln serve --storage, both on one versitygw =="
  for r in 1 2 3; do
    printf 'round %d, %d genrules at --jobs=1: serve --storage %6.2f s, cluster %6.2f s: the cluster adds %s ms per action\n' "$r" "$N" "${ts[r]}" "${tc[r]}" "${seqrow[r-1]}"
  done
  printf '%s\n' "${seqrow[@]}" | sort -g | awk '{ v[NR] = $1 } END { printf "median: the cluster path adds %.1f ms per action\n", v[int((NR+1)/2)] }'
  printf '%-44s %8.2f s\n' "serve --storage: $((4*N)) actions at --jobs=8" "$t_sfull" "cluster: $((4*N)) actions at --jobs=8" "$t_cfull"
  awk -v sf="$t_sfull" -v cf="$t_cfull" 'BEGIN { printf "ratio cluster/serve at --jobs=8: %.2f\n", cf/sf }'
  phases() { awk '
    /^kiln_execution_phase_seconds_sum/ { match($0, /phase="[a-z_]+"/); p=substr($0, RSTART+7, RLENGTH-8); sum[p]+=$2 }
    /^kiln_execution_phase_seconds_count/ { match($0, /phase="[a-z_]+"/); p=substr($0, RSTART+7, RLENGTH-8); cnt[p]+=$2 }
    END { for (p in sum) if (cnt[p] > 0) printf "  %-14s %7.1f ms  (%d actions)\n", p, 1000*sum[p]/cnt[p], cnt[p] }'; }
  # kiln_cluster_path_seconds: per action, queued at the frontend to its result seen
  # there, less the worker's run; the median is read off the histogram's buckets.
  path() { awk '
    /^kiln_cluster_path_seconds_bucket/ { match($0, /le="[^"]+"/); le[++n]=substr($0, RSTART+4, RLENGTH-5); c[n]=$2 }
    /^kiln_cluster_path_seconds_sum/ { sum=$2 } /^kiln_cluster_path_seconds_count/ { cnt=$2 }
    END { if (cnt == 0) { print "  no actions"; exit } half=cnt/2; lo=0; prev=0
          for (i=1; i<=n; i++) { if (c[i] >= half) { hi=(le[i]=="+Inf") ? lo : le[i]; med=lo+(hi-lo)*(half-prev)/(c[i]-prev); break } lo=le[i]; prev=c[i] }
          printf "  median %.2f ms, mean %.2f ms (%d actions)\n", 1000*med, 1000*sum/cnt, cnt }'; }
  echo "the cluster path around the worker's run (kiln_cluster_path_seconds), the $((3*N)) genrules at --jobs=1:"
  path < "$cl/frontend-genrules.metrics"
  echo "the same, everything (the --jobs=8 build too):"
  curl -s http://127.0.0.1:18855/metrics | path
  # The phases whose work the cluster changes (inputs read from the bucket rather than
  # the local tier, the pending marker beside the link): worker minus serve, per action.
  io() { awk '
    /^kiln_execution_phase_seconds_(sum|count)/ && /phase="(input_fetch|output_upload|attest)"/ {
      match($0, /phase="[a-z_]+"/); p=substr($0, RSTART+7, RLENGTH-8); if ($1 ~ /_sum/) sum[p]+=$2; else cnt[p]+=$2 }
    END { for (p in sum) if (cnt[p] > 0) t += sum[p]/cnt[p]; printf "%.3f", 1000*t }'; }
  p_ms=$(awk '/^kiln_cluster_path_seconds_sum/ { s=$2 } /^kiln_cluster_path_seconds_count/ { c=$2 } END { printf "%.3f", c ? 1000*s/c : 0 }' "$cl/frontend-genrules.metrics")
  w_io=$(io < "$cl/workers-genrules.metrics"); s_io=$(io < "$cl/serve-genrules.metrics")
  awk -v p="$p_ms" -v w="$w_io" -v s="$s_io" 'BEGIN { printf "the %d genrules: input fetch + output upload + attestation, worker %.2f ms, serve %.2f ms (%+.2f); with the path (mean %.2f ms) the cluster adds %.2f ms per action\n", 3*'"$N"', w, s, w-s, p, p+w-s }'
  echo "the $((3*N)) genrules at --jobs=1 alone, per-action time by phase: serve --storage, then the cluster's workers:"
  phases < "$cl/serve-genrules.metrics"; echo "  --"; phases < "$cl/workers-genrules.metrics"
  echo "serve --storage per-action time by phase (--jobs=8 build and the genrules):"
  curl -s http://127.0.0.1:18853/metrics | phases
  echo "cluster worker per-action time by phase (both workers, --jobs=8 build and the genrules):"
  { curl -s http://127.0.0.1:18861/metrics; curl -s http://127.0.0.1:18862/metrics; } | phases
fi
if [[ -n ${BUILDBARN:-} && -z ${CLUSTER_ONLY:-} ]]; then
  echo "buildbarn CPU in a clean build (bb_storage, bb_scheduler, bb_worker, bb_runner + the actions; median): $c_bb s"
  echo "buildbarn per-action time by stage (mean over the clean builds; queued from the scheduler):"
  { curl -s http://127.0.0.1:18825/metrics; curl -s http://127.0.0.1:18824/metrics; } | awk '
    /^buildbarn_builder_in_memory_build_queue_tasks_queued_duration_seconds_sum/ { sum["queued"] += $NF }
    /^buildbarn_builder_in_memory_build_queue_tasks_queued_duration_seconds_count/ { cnt["queued"] += $NF }
    /^buildbarn_builder_build_executor_duration_seconds_(sum|count)/ {
      match($0, /stage="[A-Za-z]+"/); p = substr($0, RSTART+7, RLENGTH-8)
      if ($0 ~ /_sum/) sum[p] += $NF; else cnt[p] += $NF }
    END { n = split("queued FetchingInputs Running UploadingOutputs", order, " ")
          for (i = 1; i <= n; i++) { p = order[i]; if (cnt[p] > 0) printf "  %-16s %7.1f ms  (%d actions)\n", p, 1000*sum[p]/cnt[p], cnt[p] }
          if (cnt["FetchingInputs"] > 0 && cnt["UploadingOutputs"] > 0)
            printf "  worker overhead (input fetch + output upload): %.1f ms per action\n", 1000*(sum["FetchingInputs"]/cnt["FetchingInputs"] + sum["UploadingOutputs"]/cnt["UploadingOutputs"]) }'
fi
