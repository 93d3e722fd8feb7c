#!/usr/bin/env bash
# setup.sh installs what kiln's build, tests and demo need on Debian 12, idempotently:
# Debian packages (only those missing) and the Go modules in go.sum.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(
  gcc libc6-dev pkg-config libseccomp-dev   # cgo + seccomp for the sandbox
  busybox-static                            # the tiny test toolchain
  bubblewrap                                # benchmark peer for the sandbox
  bazel-bootstrap                           # Bazel 4.2.3, the real REAPI client in e2e tests
  debootstrap                               # builds the debian-gcc toolchain recipe
  chromium                                  # headless browser of the web UI's e2e test
  ca-certificates curl
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go modules: go.sum pins them; GONOSUMDB lets the remote-apis modules (served only at
# exact versions) verify against go.sum alone.
export GONOSUMDB=github.com/bazelbuild
go mod download

# versitygw: a real S3-compatible server (Apache-2.0) that the shared-storage tests and
# `make bench` start on a temp dir. Built from the Go module proxy (about a minute, once).
VERSITYGW_VERSION=v1.8.0
gobin=$(go env GOBIN); gobin=${gobin:-$(go env GOPATH)/bin}
if ! go version -m "$gobin/versitygw" 2>/dev/null | grep -q "^[[:space:]]*mod[[:space:]]*github.com/versity/versitygw[[:space:]]*$VERSITYGW_VERSION"; then
  echo "setup: installing versitygw $VERSITYGW_VERSION" >&2
  go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
fi

# nats-server: the real NATS JetStream server (Apache-2.0) the cluster tests start on a
# temp dir (kiln cluster, docs/cluster.md). Debian's 2.9.10 is too old for kiln.
NATS_SERVER_VERSION=v2.15.3
if ! go version -m "$gobin/nats-server" 2>/dev/null | grep -q "^[[:space:]]*mod[[:space:]]*github.com/nats-io/nats-server/v2[[:space:]]*$NATS_SERVER_VERSION"; then
  echo "setup: installing nats-server $NATS_SERVER_VERSION" >&2
  go install "github.com/nats-io/nats-server/v2@$NATS_SERVER_VERSION"
fi
