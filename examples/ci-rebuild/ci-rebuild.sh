#!/usr/bin/env bash
# ci-rebuild.sh: a CI job that builds examples/bazel-hello through kiln, exports the
# binary's provenance and a rebuild bundle, rebuilds it on two fresh data dirs (in real
# life: two machines that trust only the builder's public keys), publishes the signed
# verification summaries, and asks the promotion gate whether the binary may go to
# production. Exits non-zero if anything does not verify, a rebuild is not bit-for-bit
# identical (the binary is then quarantined on the verifier) or the gate denies.
#
#   ci-rebuild.sh [--kiln BIN] [--out DIR]
#   ci-rebuild.sh --builder-data DIR --workspace DIR [--out DIR]   # reuse a build
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
KILN=${KILN:-$repo/bin/kiln}
out="" builder="" ws=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kiln) KILN=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --builder-data) builder=$2; shift 2 ;;
    --workspace) ws=$2; shift 2 ;;
    *) echo "ci-rebuild: unknown argument $1" >&2; exit 2 ;;
  esac
done
work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-ci.XXXXXX")
# The data dirs, the workspace and Bazel's output root (about 2 GB) go with the job,
# unless the published files live among them (no --out) or KILN_CI_KEEP=1.
keep=${KILN_CI_KEEP:-}
[ -z "$out" ] && keep=1
out=${out:-$work/publish}
mkdir -p "$out"
step() { printf '\n== ci: %s\n' "$*"; }
pids=()
cleanup() {
  [ -n "${bz_root:-}" ] && (cd "$ws" && bazel --output_user_root="$bz_root" shutdown >/dev/null 2>&1) || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -z "$keep" ]; then
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
  else
    echo "ci-rebuild: the job's files are in $work" >&2
  fi
}
trap cleanup EXIT

if [ -z "$builder" ]; then
  # 1. Build on the builder: the pinned toolchain, kiln serve, Bazel remote execution.
  step "build examples/bazel-hello through kiln"
  builder=$work/builder
  digest=$("$repo/toolchains/debian-gcc/build.sh" --data "$builder" --kiln "$KILN")
  port=$((20000 + RANDOM % 20000))
  "$KILN" serve --data "$builder" --listen "127.0.0.1:$port" --http-listen "" --log-level warn &
  pids+=($!)
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
  ws=$work/ws
  cp -r "$repo/examples/bazel-hello" "$ws"
  rm -f "$ws"/bazel-*
  bz_root=$work/bazel
  (cd "$ws" && bazel --output_user_root="$bz_root" build --remote_executor="grpc://127.0.0.1:$port" \
    --remote_default_exec_properties="container-image=docker://kiln/debian-gcc@$digest" //app:hello 2>&1 |
    grep -E "^(INFO: [0-9]+ processes|ERROR)")
fi
artifact=$ws/bazel-bin/app/hello
[ -f "$artifact" ] || { echo "ci-rebuild: no $artifact" >&2; exit 2; }

# 2. Attest on the builder: provenance + SBOM, the bundle, the public keys.
step "provenance, SBOM and rebuild bundle for $(basename "$artifact")"
"$KILN" attest provenance --data "$builder" --subject "$artifact" --out "$out/hello.intoto.json" --sbom "$out/hello.cdx.json" --wait 30s
"$KILN" attest pubkey --data "$builder" --all --json > "$out/builder-keys.json"
"$KILN" attest verify --data "$builder" --subject "$artifact" --key "$out/builder-keys.json" --provenance "$out/hello.intoto.json" --sbom "$out/hello.cdx.json"
"$KILN" export --data "$builder" --subject "$artifact" --out "$out/hello.bundle.tar.zst"
cp "$artifact" "$out/hello"

# 3. Rebuild on the verifier: nothing shared with the builder but the published files.
step "rebuild from the bundle on a fresh data dir"
verifier=$work/verifier
"$KILN" rebuild "$out/hello.intoto.json" --bundle "$out/hello.bundle.tar.zst" --key "$out/builder-keys.json" \
  --data "$verifier" --out "$out/hello.vsa.json"

# 4. Publish: the verification summary, checkable with the verifier's public key.
step "publish the verification summary"
"$KILN" attest pubkey --data "$verifier" --all --json > "$out/verifier-keys.json"
"$KILN" attest verify-summary "$out/hello.vsa.json" --key "$out/verifier-keys.json" --subject "$out/hello"

# 5. A second, independent verifier: production wants two rebuilds by distinct keys.
step "rebuild again on a second verifier"
verifier2=$work/verifier-2
"$KILN" rebuild "$out/hello.intoto.json" --bundle "$out/hello.bundle.tar.zst" --key "$out/builder-keys.json" \
  --data "$verifier2" --out "$out/hello.vsa-2.json"
"$KILN" attest pubkey --data "$verifier2" --all --json > "$out/verifier-2-keys.json"

# 6. The promotion gate (on the deployer: nothing but the published files). The
# production policy allows only reviewed toolchains; this job lists the one it built.
step "promotion gate: may the binary go to production?"
digest=${digest:-$("$KILN" toolchain ls --data "$builder" | awk '/kiln\/debian-gcc/ {print $1; exit}')}
sed "s/^  toolchains: \[\]\$/  toolchains: [\"${digest#sha256:}\"]/" "$repo/examples/gate/production.yaml" > "$out/production-policy.yaml"
grep -q "${digest#sha256:}" "$out/production-policy.yaml" || { echo "ci-rebuild: no toolchain digest for the policy" >&2; exit 2; }
gate=$work/gate
"$KILN" gate --policy "$out/production-policy.yaml" --stage production --subject "$out/hello" \
  --provenance "$out/hello.intoto.json" --sbom "$out/hello.cdx.json" \
  --vsa "$out/hello.vsa.json" --vsa "$out/hello.vsa-2.json" \
  --keys "$out/builder-keys.json" --keys "$out/verifier-keys.json" --keys "$out/verifier-2-keys.json" \
  --bundle "$out/hello.bundle.tar.zst" --data "$gate" --out "$out/hello.decision.json"
"$KILN" attest pubkey --data "$gate" --all --json > "$out/gate-keys.json"
echo "published in $out:"
ls -l "$out"
