#!/usr/bin/env bash
# demo-rebuild.sh: the demo's last step: provenance, SBOM and links of the binary the
# demo built, then a bit-for-bit rebuild from a bundle on a fresh data dir, with a signed
# verification summary (examples/ci-rebuild). Needs DEMO, KILN, DATA and WS from demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
printf '\n\033[1m== %s\033[0m\n' "signed links, provenance and a reproducibility check (examples/ci-rebuild)"
examples/ci-rebuild/ci-rebuild.sh --kiln "$KILN" --builder-data "$DATA" --workspace "$WS" --out "$DEMO/publish"
