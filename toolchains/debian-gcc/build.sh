#!/usr/bin/env bash
# debian-gcc recipe: Debian bookworm (debootstrap --variant=minbase) with bash, coreutils,
# gcc, g++, binutils, make and libc6-dev: the toolchain of the Bazel example.
#
#   toolchains/debian-gcc/build.sh --data DIR [--kiln BIN] [--rebuild] [--print-key]
#
# Prints the image's manifest digest (sha256:...) on stdout after importing it into
# the kiln data dir DIR. Needs root, the Debian package debootstrap and the mirror
# (MIRROR, default http://deb.debian.org/debian); takes minutes the first time, then
# seconds from the recipe cache (see ../recipe-lib.sh). SUITE, MIRROR and INCLUDE
# may be overridden from the environment; they are part of the cache key.
#
# Rebuilding another day can give another digest (Debian publishes updates): pin the
# digest, and move the image between machines with `kiln toolchain export/import`.
RECIPE_NAME=debian-gcc
RECIPE_SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
# shellcheck source=../recipe-lib.sh
. "$(dirname "$RECIPE_SCRIPT")/../recipe-lib.sh"
recipe_parse_args "$@"

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
INCLUDE=${INCLUDE:-bash,coreutils,gcc,g++,binutils,make,libc6-dev}
ARCH=$(dpkg --print-architecture)

build_root() {
  local root="$1"
  [ "$(id -u)" = 0 ] || recipe_die "debootstrap needs root"
  command -v debootstrap >/dev/null || recipe_die "debootstrap not found: apt-get install debootstrap"
  recipe_log "debootstrap $SUITE ($ARCH) from $MIRROR with $INCLUDE"
  local log="$root.debootstrap.log"
  if ! debootstrap --variant=minbase --arch="$ARCH" --include="$INCLUDE" \
    "$SUITE" "$root" "$MIRROR" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    recipe_die "debootstrap failed (last lines above)"
  fi
  # debootstrap unmounts what it mounted; make sure, then never descend into mounts.
  { findmnt -rn -o TARGET | grep -F "$root/" | sort -r | while read -r m; do umount -l "$m"; done; } || true
  clean_root "$root"
}

# clean_root removes what differs between two debootstraps of the same packages or
# ties the image to this host: package indexes, caches, logs, backups, machine ids,
# device nodes, host network files; and adds the uid 1000 build user sandboxes use.
clean_root() {
  local root="$1"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/archives/partial/* \
    "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
    "$root"/var/cache/ldconfig/aux-cache "$root"/var/lib/dbus/machine-id \
    "$root"/etc/machine-id "$root"/etc/passwd- "$root"/etc/group- "$root"/etc/shadow- \
    "$root"/etc/gshadow- "$root"/etc/subuid- "$root"/etc/subgid- \
    "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.bash_history \
    "$root"/debootstrap "$root"/etc/resolv.conf
  find "$root/var/log" -type f -delete
  # Device nodes (debootstrap creates /dev/null & co.) are refused by kiln: the
  # sandbox provides /dev. Same for anything in /proc and /sys.
  rm -rf "$root"/dev/* "$root"/proc/* "$root"/sys/* "$root"/run/*
  # shadow's "last password change" is the day of the build.
  sed -i -E 's/^([^:]*:[^:]*:)[0-9]*:/\1:/' "$root/etc/shadow"
  printf 'kiln\n' >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$root/etc/hosts"
  # The build user sandboxes run as (uid/gid 1000).
  grep -q '^build:' "$root/etc/passwd" || {
    echo 'build:x:1000:1000:build:/home/build:/bin/bash' >>"$root/etc/passwd"
    echo 'build:x:1000:' >>"$root/etc/group"
    echo 'build:*::0:99999:7:::' >>"$root/etc/shadow"
    echo 'build:*::' >>"$root/etc/gshadow"
  }
  mkdir -p "$root/home/build"
  # Anything else a build might leave that kiln refuses (sockets, device nodes).
  find "$root" -xdev \( -type s -o -type b -o -type c \) -print -delete >&2
}

recipe_run "$(recipe_key "$SUITE" "$MIRROR" "$INCLUDE" "$ARCH" minbase)" build_root "kiln/debian-gcc:$SUITE"
