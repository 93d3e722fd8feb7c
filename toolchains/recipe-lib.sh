# recipe-lib.sh: shared by the toolchain recipes (toolchains/*/build.sh); source it.
#
# A recipe builds a root filesystem, turns it into an image with `kiln toolchain build`
# and prints the image's manifest digest on stdout (progress goes to stderr).
#
# Recipe image cache: the built image is exported as an OCI layout to
#   ${KILN_RECIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln-recipes}/<recipe>-<key>/
# where <key> hashes the recipe script, this library and the recipe's declared inputs
# (package list, suite, mirror, architecture, input file digests). When that layout
# exists the recipe only imports it (seconds), so tests and `make demo` build each
# recipe once per machine. --rebuild ignores and replaces the cache entry.
#
# Common flags: --data DIR (required: the kiln data dir to import into), --kiln BIN
# (default: $KILN_BIN, else bin/kiln of this checkout, else kiln on PATH), --rebuild,
# --print-key (print the cache key and exit).

set -euo pipefail

recipe_log() { echo "$RECIPE_NAME: $*" >&2; }
recipe_die() { echo "$RECIPE_NAME: $*" >&2; exit 1; }

# recipe_parse_args parses the common flags into DATA, KILN, REBUILD, PRINT_KEY.
recipe_parse_args() {
  DATA="" KILN="${KILN_BIN:-}" REBUILD=0 PRINT_KEY=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --data) DATA="${2:?--data needs a directory}"; shift 2 ;;
      --data=*) DATA="${1#--data=}"; shift ;;
      --kiln) KILN="${2:?--kiln needs a path}"; shift 2 ;;
      --kiln=*) KILN="${1#--kiln=}"; shift ;;
      --rebuild) REBUILD=1; shift ;;
      --print-key) PRINT_KEY=1; shift ;;
      -h|--help) sed -n '2,/^$/p' "$RECIPE_SCRIPT" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
      *) recipe_die "unknown argument $1 (see --help)" ;;
    esac
  done
  if [ -z "$KILN" ]; then
    local repo_bin
    repo_bin="$(cd "$(dirname "$RECIPE_SCRIPT")/../.." && pwd)/bin/kiln"
    if [ -x "$repo_bin" ]; then KILN="$repo_bin"; else KILN="$(command -v kiln || true)"; fi
  fi
  if [ "$PRINT_KEY" = 0 ]; then
    [ -n "$DATA" ] || recipe_die "--data DIR is required"
    [ -n "$KILN" ] && [ -x "$KILN" ] || recipe_die "no kiln binary (run make build, or pass --kiln BIN / set KILN_BIN)"
  fi
}

# recipe_key INPUTS... prints the cache key: sha256 of the recipe script, this
# library and the given input strings.
recipe_key() {
  {
    sha256sum "$RECIPE_SCRIPT" "${BASH_SOURCE[0]}" | cut -d' ' -f1
    printf '%s\n' "$@"
  } | sha256sum | cut -c1-32
}

# recipe_run KEY BUILD_FN IMAGE_NAME: import the cached image for KEY if present,
# else call BUILD_FN ROOTDIR to fill a fresh root, build the image, cache it.
# Prints the manifest digest on stdout.
recipe_run() {
  local key="$1" build_fn="$2" image_name="$3"
  local cache_root="${KILN_RECIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln-recipes}"
  local entry="$cache_root/$RECIPE_NAME-$key"
  if [ "$PRINT_KEY" = 1 ]; then echo "$key"; return 0; fi
  mkdir -p "$cache_root"

  # One build per key at a time on this machine; others wait and then import.
  exec 9>"$entry.lock"
  flock 9

  if [ "$REBUILD" = 1 ] && [ -e "$entry" ]; then
    recipe_log "--rebuild: dropping cache entry $entry"
    rm -rf "$entry"
  fi
  if [ -d "$entry" ]; then
    recipe_log "importing cached image $entry"
    local d
    if d="$("$KILN" toolchain import --data "$DATA" --name "$image_name" "$entry")"; then
      echo "$d"
      return 0
    fi
    recipe_log "cached image refused; rebuilding"
    rm -rf "$entry"
  fi

  local work
  work="$(mktemp -d "${TMPDIR:-/var/tmp}/kiln-recipe-$RECIPE_NAME.XXXXXX")"
  # shellcheck disable=SC2064
  trap "recipe_cleanup '$work'" EXIT
  mkdir "$work/root"
  local start=$SECONDS
  "$build_fn" "$work/root"
  recipe_log "root ready in $((SECONDS - start))s; making the image"
  local d
  d="$("$KILN" toolchain build --data "$DATA" --rootfs "$work/root" --name "$image_name")"
  rm -rf "$entry.tmp"
  "$KILN" toolchain export --data "$DATA" "$d" "$entry.tmp"
  mv "$entry.tmp" "$entry"
  recipe_log "built $d in $((SECONDS - start))s; cached at $entry"
  echo "$d"
}

# recipe_cleanup removes the work dir, unmounting anything a build left mounted.
recipe_cleanup() {
  local work="$1"
  if command -v findmnt >/dev/null; then
    { findmnt -rn -o TARGET | grep -F "$work/" | sort -r | while read -r m; do umount -l "$m"; done; } || true
  fi
  rm -rf "$work" || true
}
