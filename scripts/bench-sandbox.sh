#!/usr/bin/env bash
# bench-sandbox.sh measures per-action sandbox overhead: create -> run /bin/true ->
# destroy, for kiln (cold: prepared on demand; warm: from a pool of one prepared
# sandbox) interleaved with Debian's bubblewrap and a bare fork/exec, over RUNS runs
# (default 200). Prints p50/p95 latency, their ratios, and CPU per run.
# kiln runs two ways: sandboxd-* through kiln-sandboxd (kiln built by make), inproc-*
# from the test process (kiln with KILN_SANDBOX_DAEMON=0). sandboxd/inproc-* is what
# going through the daemon costs.
# Needs root, busybox-static, bubblewrap, gcc (scripts/setup.sh installs them).
# TRACE=1 also prints the mean time of each phase of the kiln runs (wall clock).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-200}"
export CGO_ENABLED=1 GONOSUMDB=github.com/bazelbuild
out=$(mktemp)
trace=$(mktemp)
trap 'rm -f "$out" "$trace"' EXIT
if [ -n "${TRACE:-}" ]; then export KILN_SANDBOX_TRACE="$trace"; fi
go test -tags seccomp -count=1 -run '^$' -bench 'BenchmarkSandboxOverhead$' -benchtime "${runs}x" ./sandbox/ >"$out"
echo "sandbox overhead, ${runs} runs each, interleaved (go test -tags seccomp -run '^\$' -bench BenchmarkSandboxOverhead -benchtime ${runs}x ./sandbox/):"
grep '^BenchmarkSandboxOverhead' "$out" | tr '\t' '\n' | sed -n 's/^ *\([0-9.]*\) \(.*\)$/  \2 \1/p' | grep -v 'ns/op' | grep -- '-' | sort
if [ -n "${TRACE:-}" ]; then
  echo "kiln phase means (ms, wall clock; prepare = cold set-up; take = waiting for a prepared sandbox, mostly in the back-to-back CPU pass):"
  grep '^sandbox trace:' "$trace" | awk '{
      for (i = 3; i <= NF; i++) { split($i, kv, "="); sub("ms", "", kv[2]); s[kv[1]] += kv[2]; n[kv[1]]++ } }
    END { for (k in s) printf "  %-8s %7.2f  (%d runs)\n", k, s[k] / n[k], n[k] }'
fi
